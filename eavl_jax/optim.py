"""The optimizer: Adam(W), polynomial decay (power 0.9) to `end_learning_rate`, optional warmup,
weight decay except on `optim.weight_decay_exempt`'s parameters, gradient clipping, per-parameter
lr multipliers, BERT layers left out of training (`optim.text_encoder_trainable_layers`) and
gradient accumulation (`optax.MultiSteps`), all from `config.optim` (docs/training.md).

One optimizer *update* is `grad_accum_steps` train steps: the schedule counts updates.
"""
import re

import jax
import optax

OPTIMIZERS = ('adamw', 'adam')
# optim.weight_decay_exempt: 'norms_and_biases': every norm's parameters, every bias and Swin's
# relative-position tables | 'lavt': only the image encoder's norms and relative-position tables
# (LAVT's train.py), everything else decays.
WEIGHT_DECAY_EXEMPT = ('norms_and_biases', 'lavt')
# Top-level parameter trees of the image encoder: Swin and the LayerNorms on its stage outputs
# (EAVL's vision_norm_i, LAVT's output_norm_i).
IMAGE_ENCODER_PREFIXES = ('vision_encoder', 'vision_norm_', 'output_norm_')


def path_name(path) -> str:
  """A key path of the parameter tree -> 'text_encoder/encoder/layer/0/attention/...'."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def learning_rate_schedule(optim_config, total_updates):
  """Linear warmup from 0 (optional), then polynomial decay (power 0.9) to the end value."""
  o = optim_config
  warmup = o.warmup_steps
  decay = optax.polynomial_schedule(o.learning_rate, o.end_learning_rate, o.decay_power,
                                    transition_steps=total_updates - warmup)
  if not warmup:
    return decay
  ramp = optax.linear_schedule(0.0, o.learning_rate, warmup)
  return optax.join_schedules([ramp, decay], boundaries=[warmup])


def decays(path, exempt: str = 'norms_and_biases') -> bool:
  """Whether weight decay applies to the parameter at `path`; exempt: optim.weight_decay_exempt."""
  names = path_name(path).split('/')
  if exempt == 'lavt':   # the image encoder's norm1, downsample/norm, vision_norm_2, ... and tables
    image_encoder = names[0].startswith(IMAGE_ENCODER_PREFIXES)
    return not (image_encoder and (any('norm' in n for n in names)
                                   or names[-1] == 'relative_position_bias_table'))
  if names[-1] == 'scale' or 'bias' in names[-1]:  # bias, relative_position_bias_table
    return False
  return not any('norm' in n.lower() for n in names)  # LayerNorm_0, norm1, vision_norm_2, ...


def text_encoder_frozen(optim_config, path) -> bool:
  """optim.text_encoder_trainable_layers = N >= 0: BERT's encoder layers 0..N-1 train, its
  embeddings and layers N.. do not (LAVT: N = 10 of 12). -1: every parameter of BERT trains."""
  n = optim_config.text_encoder_trainable_layers
  names = path_name(path).split('/')
  if n < 0 or names[0] != 'text_encoder':
    return False
  if names[1:3] == ['encoder', 'layer']:   # text_encoder/encoder/layer/<i>/...
    return int(names[3]) >= n
  return True                              # text_encoder/embeddings/...


def lr_multiplier(optim_config, path) -> float:
  """0 for a BERT parameter that optim.text_encoder_trainable_layers leaves out; else the factor
  of the first `optim.lr_multipliers` (regex, factor) whose regex matches the whole path
  ('text_encoder/.*'); 1 when none does. Factor 0 freezes the parameter."""
  if text_encoder_frozen(optim_config, path):
    return 0.0
  name = path_name(path)
  for pattern, factor in optim_config.lr_multipliers:
    if re.fullmatch(pattern, name):
      return float(factor)
  return 1.0


def decay_mask(optim_config, params):
  """True for the parameters AdamW decays (optim.weight_decay_exempt)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: decays(p, optim_config.weight_decay_exempt), params)


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
  """-> (optax transformation, schedule). The schedule maps an update count to the lr.

  The values were checked by config_check.validate (the counts by run_sizes.check); the trainer
  builds this once per run, for run_sizes' total_updates."""
  o = optim_config
  schedule = learning_rate_schedule(o, total_updates)
  parts = []
  if o.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
  if o.name == 'adamw':
    mask = lambda params: decay_mask(o, params)
    parts.append(optax.adamw(schedule, o.b1, o.b2, weight_decay=o.weight_decay, mask=mask))
  else:
    parts.append(optax.adam(schedule, o.b1, o.b2))
  if o.lr_multipliers or o.text_encoder_trainable_layers >= 0:
    parts.append(scale_by_multipliers(o))   # factor 0: no update, weight decay included
  tx = optax.chain(*parts)
  if o.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
  return tx, schedule
