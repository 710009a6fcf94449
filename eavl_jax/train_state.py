"""The training state and its creation directly in its final sharding."""
from typing import Any

import flax
import jax
import jax.numpy as jnp

from eavl_jax import hub
from eavl_jax import sharding as sharding_lib
from eavl_jax import weights
from eavl_jax.models import builder
from eavl_jax.weights import lavt as lavt_weights


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # () int32: train steps done (micro-batches, with gradient accumulation)
  params: Any
  opt_state: Any
  rng: jax.Array        # (2,) uint32 base key; step s uses fold_in(rng, s)
  batch_stats: Any = None  # BatchNorm running averages (model.head_norm='batch'); {} without

  def variables(self):
    """The model's variables for `model.apply`: parameters and BatchNorm statistics."""
    return {'params': self.params, 'batch_stats': self.batch_stats}


def state_shardings(abstract_state, mesh, param_sharding):
  """Parameters and optimizer state by `mesh.param_sharding`; step and RNG replicated."""
  replicated = sharding_lib.replicated(mesh)
  return TrainState(
      step=replicated,
      params=sharding_lib.tree_shardings(abstract_state.params, mesh, param_sharding),
      opt_state=sharding_lib.tree_shardings(abstract_state.opt_state, mesh, param_sharding),
      rng=replicated,
      batch_stats=jax.tree.map(lambda _: replicated, abstract_state.batch_stats))


def make_init_fn(model, model_config, tx):
  inputs = builder.dummy_inputs(model_config, 1)

  def init(rng):
    params_rng, train_rng = jax.random.split(rng)
    variables = model.init(params_rng, *inputs, train=False)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=train_rng, batch_stats=variables.get('batch_stats', {}))
  return init


def abstract_train_state(config, model, tx, mesh):
  """-> (TrainState of ShapeDtypeStructs, TrainState of NamedShardings); allocates nothing."""
  init = make_init_fn(model, config.model, tx)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  return abstract, state_shardings(abstract, mesh, config.mesh.param_sharding)


def abstract_variables(model_config, batch_size=1):
  """{'params', 'batch_stats'} of the model as ShapeDtypeStructs (jax.eval_shape: nothing is
  allocated); 'batch_stats' is {} without BatchNorm in the head. model_config: with the
  text-encoder sizes already resolved (weights.with_checkpoint_text_sizes)."""
  model = builder.build_model(model_config)
  inputs = builder.dummy_inputs(model_config, batch_size)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, train=False))
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def uses_pretrained(model_config) -> bool:
  """An encoder's `pretrained` names weights to load (neither '' nor 'scratch')."""
  return (hub.names_checkpoint(model_config.vision_encoder.pretrained)
          or hub.names_checkpoint(model_config.text_encoder.pretrained))


def create_train_state(config, model, tx, mesh, *, load_pretrained=True):
  """Initialises the TrainState in place on the mesh (jit with out_shardings), then replaces the
  encoders by the pretrained weights the config names.

  Returns (state, shardings).
  """
  init = make_init_fn(model, config.model, tx)
  abstract, shardings = abstract_train_state(config, model, tx, mesh)
  state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(config.seed))
  if load_pretrained and uses_pretrained(config.model):
    params = weights.load_pretrained_encoders(_host_params(state.params), config.model)
    _check_same_structure(params, abstract.params)
    # Adam's moments are zeros whatever the values, so the optimizer state stays valid.
    state = state.replace(params=sharding_lib.put_global(params, shardings.params))
  if load_pretrained and config.model.name == 'lavt' and config.model.lavt.pretrained:
    host = _host_params(state.variables())
    # A released LAVT: every weight it has, BatchNorm's running averages too.
    variables = lavt_weights.load_lavt(config.model.lavt.pretrained, host, config.model)
    _check_same_structure(variables, host)
    state = state.replace(
        params=sharding_lib.put_global(variables['params'], shardings.params),
        batch_stats=sharding_lib.put_global(variables['batch_stats'], shardings.batch_stats))
  return state, shardings


def _host_params(params):
  """Fully addressable (replicated or single-process) parameters -> numpy on this host."""
  return jax.tree.map(lambda x: jax.device_get(x) if x.is_fully_addressable else
                      jax.device_get(jax.jit(lambda y: y, out_shardings=jax.sharding.NamedSharding(
                          x.sharding.mesh, jax.sharding.PartitionSpec()))(x)), params)


def _check_same_structure(params, abstract_params):
  got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)
  want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), abstract_params)
  if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
    raise ValueError('load_pretrained_encoders changed the parameter tree (names, shapes or dtypes)')
