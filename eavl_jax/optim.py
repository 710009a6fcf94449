"""The optimizer: Adam(W), polynomial decay (power 0.9) to `end_learning_rate`, optional warmup,
no weight decay on norms and biases, gradient clipping, per-parameter lr multipliers and gradient
accumulation (`optax.MultiSteps`), all from `config.optim`.

One optimizer *update* is `grad_accum_steps` train steps: the schedule counts updates.
"""
import re

import jax
import optax

OPTIMIZERS = ('adamw', 'adam')


def path_name(path) -> str:
  """A key path of the parameter tree -> 'text_encoder/encoder/layer/0/attention/...'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def learning_rate_schedule(optim_config, total_updates):
  """Linear warmup from 0 (optional), then polynomial decay (power 0.9) to the end value."""
  o = optim_config
  warmup = o.warmup_steps
  if total_updates <= warmup:
    raise ValueError(f'optim.warmup_steps={warmup} leaves no room in {total_updates} updates')
  decay = optax.polynomial_schedule(o.learning_rate, o.end_learning_rate, o.decay_power,
                                    transition_steps=total_updates - warmup)
  if not warmup:
    return decay
  ramp = optax.linear_schedule(0.0, o.learning_rate, warmup)
  return optax.join_schedules([ramp, decay], boundaries=[warmup])


def decays(path) -> bool:
  """Weight decay applies to kernels and embeddings: not to biases, scales or any norm's params."""
  names = path_name(path).split('/')
  if names[-1] == 'scale' or 'bias' in names[-1]:  # bias, relative_position_bias_table
    return False
  return not any('norm' in n.lower() for n in names)  # LayerNorm_0, norm1, vision_norm_2, ...


def lr_multiplier(optim_config, path) -> float:
  """The factor of the first `optim.lr_multipliers` (regex, factor) whose regex matches the whole
  path ('text_encoder/.*'); 1 when none does. Factor 0 freezes the parameter."""
  name = path_name(path)
  for pattern, factor in optim_config.lr_multipliers:
    if re.fullmatch(pattern, name):
      return float(factor)
  return 1.0


def frozen_mask(optim_config, params):
  """True for parameters with lr multiplier 0: the train step stops their gradients."""
  return jax.tree_util.tree_map_with_path(lambda p, _: lr_multiplier(optim_config, p) == 0.0,
                                          params)


def scale_by_multipliers(optim_config) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda p, u: u * lr_multiplier(optim_config, p), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim_config, total_updates):
  """-> (optax transformation, schedule). The schedule maps an update count to the lr."""
  o = optim_config
  if o.name not in OPTIMIZERS:
    raise ValueError(f'optim.name={o.name!r}: must be one of {OPTIMIZERS}')
  if o.grad_accum_steps < 1:
    raise ValueError(f'optim.grad_accum_steps={o.grad_accum_steps} must be >= 1')
  schedule = learning_rate_schedule(o, total_updates)
  parts = []
  if o.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.name == 'adamw':
    mask = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: decays(p), params)
    parts.append(optax.adamw(schedule, o.b1, o.b2, weight_decay=o.weight_decay, mask=mask))
  else:
    parts.append(optax.adam(schedule, o.b1, o.b2))
  if o.lr_multipliers:
    parts.append(scale_by_multipliers(o))
  tx = optax.chain(*parts)
  if o.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
  return tx, schedule
