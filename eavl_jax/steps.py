"""The train step and the predict function alone: no data pipeline, checkpoints or loop, so that
they import where only jax, flax, optax, transformers and ml_collections are (benchmarks/
device_check.py on a bare GPU machine). The training loop (trainer.py), evaluation, tools and
benchmarks import them from here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from eavl_jax import losses
from eavl_jax import optim
from eavl_jax import run_sizes
from eavl_jax import sharding as sharding_lib
from eavl_jax import train_state as train_state_lib

TRAIN_KEYS = ('image', 'input_ids', 'attention_mask', 'mask')


def make_train_step(model, tx, schedule, config, frozen, mesh=None):
  """-> train_step(state, batch, rng) -> (state, metrics); pure, to be jitted.

  frozen: tree of bools like the params; True leaves get no gradient (lr multiplier 0).
  mesh: with `mesh.param_sharding = 'fsdp'`, the sharded parameters are gathered (all-gather) for
  the forward pass, so the batch stays split over every device and the gradients come back
  reduce-scattered to their shards (ZeRO-3), instead of XLA splitting the compute by weights.
  """
  accum = config.optim.grad_accum_steps
  refs_per_image = config.data.refs_per_image
  gather = mesh is not None and config.mesh.param_sharding == 'fsdp'

  def loss_of(params, batch_stats, batch, rng):
    if gather:
      params = jax.lax.with_sharding_constraint(params, sharding_lib.replicated(mesh))
    params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    # BatchNorm (model.head_norm='batch'): statistics of this global batch, running averages out.
    out, updated = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                               batch['input_ids'], batch['attention_mask'], train=True,
                               refs_per_image=refs_per_image, rngs={'dropout': rng},
                               mutable=['batch_stats'])
    loss = losses.loss_fn(out['logits'], batch['mask'], config.loss,
                          losses.corners_aligned(config.model))
    return loss, updated.get('batch_stats', {})

  def train_step(state, batch, rng):
    (loss, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(
        state.params, state.batch_stats, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params_finite = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
               'lr': schedule(state.step // accum), 'params_finite': params_finite}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=batch_stats)
    return new_state, metrics
  return train_step


def jit_train_step(train_step, state_shardings, mesh):
  batch = {k: sharding_lib.batch_sharding(mesh) for k in TRAIN_KEYS}
  replicated = sharding_lib.replicated(mesh)
  return jax.jit(train_step, in_shardings=(state_shardings, batch, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def abstract_train_batch(config, micro_batch):
  """ShapeDtypeStructs of a global train batch of `micro_batch` expressions, as the train loader
  makes it (eavl_jax/input_pipeline.py): micro_batch / data.refs_per_image images."""
  s, length = config.model.image_size, config.model.max_tokens
  images = micro_batch // config.data.refs_per_image
  return {
      'image': jax.ShapeDtypeStruct((images, s, s, 3), np.float32),           # (B/K, S, S, 3)
      'input_ids': jax.ShapeDtypeStruct((micro_batch, length), np.int32),     # (B, L)
      'attention_mask': jax.ShapeDtypeStruct((micro_batch, length), np.int32),  # (B, L)
      'mask': jax.ShapeDtypeStruct((micro_batch, s, s), np.uint8),            # (B, S, S)
  }


def lower_train_step(config, model, mesh, optimizer):
  """The train step of `config` with `optimizer` = (tx, schedule) (optim.make_optimizer), on
  its micro-batch, jitted and lowered ahead of time on the abstract state and batch: nothing is
  allocated. -> jax.stages.Lowered."""
  tx, schedule = optimizer
  abstract, shardings = train_state_lib.abstract_train_state(config, model, tx, mesh)
  frozen = optim.frozen_mask(config.optim, abstract.params)
  step = jit_train_step(make_train_step(model, tx, schedule, config, frozen, mesh), shardings,
                        mesh)
  return step.lower(abstract, abstract_train_batch(config, run_sizes.micro_batch(config)),
                    abstract.rng)


def make_predict_fn(model):
  """-> jitted predict(variables, batch) -> {'logits' (B, S/4, S/4), 'masks' (B, N_q, S/4, S/4),
  'scores' (B, N_q)}, the model's output; variables: TrainState.variables()."""
  return jax.jit(lambda variables, batch: dict(model.apply(
      variables, batch['image'], batch['input_ids'], batch['attention_mask'], train=False)))
