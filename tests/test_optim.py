"""LAVT's optimizer groups as config choices: optim.text_encoder_trainable_layers (which BERT
parameters train) and optim.weight_decay_exempt (which parameters AdamW does not decay)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import base
from configs import tiny
from eavl_jax import optim
from eavl_jax import sharding
from eavl_jax import train_state
from eavl_jax import steps
from eavl_jax.models import builder

STEPS = 3


def flat(tree):
  return {optim.path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def random_batch(config, batch_size=4, seed=0):
  rng = np.random.default_rng(seed)
  s, l = config.model.image_size, config.model.max_tokens
  ids = rng.integers(1000, 3000, (batch_size, l)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 101, 102
  return {'image': rng.normal(size=(batch_size, s, s, 3)).astype(np.float32),
          'input_ids': ids, 'attention_mask': np.ones_like(ids),
          'mask': (rng.random((batch_size, s, s)) > 0.7).astype(np.uint8)}


def train(config):
  """(initial parameters, parameters after STEPS train steps) of configs/tiny.py's model."""
  model = builder.build_model(config.model)
  tx, schedule = optim.make_optimizer(config.optim, total_updates=100)
  mesh = sharding.make_mesh(config.mesh)
  state, shardings = train_state.create_train_state(config, model, tx, mesh)
  before = flat(jax.device_get(state.params))
  frozen = optim.frozen_mask(config.optim, state.params)
  step = steps.jit_train_step(steps.make_train_step(model, tx, schedule, config, frozen, mesh),
                                shardings, mesh)
  batch = sharding.global_batch(random_batch(config), mesh)
  for i in range(STEPS):
    state, _ = step(state, batch, jax.random.PRNGKey(i))
  return before, flat(jax.device_get(state.params))


def test_text_encoder_layers_left_out_stay_bit_identical_and_the_rest_trains():
  config = tiny.get_config()            # BERT with 2 layers: layer 0 trains; embeddings, layer 1
  config.optim.text_encoder_trainable_layers = 1   # are left out, as LAVT leaves out 10 and 11
  config.optim.learning_rate = 1e-3
  config.optim.weight_decay_exempt = 'lavt'
  before, after = train(config)
  left_out = {k for k in before if k.startswith(('text_encoder/embeddings/',
                                                 'text_encoder/encoder/layer/1/'))}
  assert len(left_out) == 5 + 16      # word, position, token-type tables, LayerNorm; one layer
  for k in left_out:
    assert np.array_equal(before[k], after[k]), k
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed == set(before) - left_out
  assert any(k.startswith('text_encoder/encoder/layer/0/') for k in changed)

  config.optim.text_encoder_trainable_layers = -1   # all of BERT trains
  before, after = train(config)
  assert all(not np.array_equal(before[k], after[k]) for k in left_out)


def test_lr_multipliers_and_the_layer_choice_combine():
  o = tiny.get_config().optim
  o.text_encoder_trainable_layers = 1
  o.lr_multipliers = (('text_encoder/.*', 0.1), ('neck/.*', 0.0))
  path = lambda name: tuple(jax.tree_util.DictKey(k) for k in name.split('/'))
  assert optim.lr_multiplier(o, path('text_encoder/encoder/layer/1/output/dense/kernel')) == 0.0
  assert optim.lr_multiplier(o, path('text_encoder/embeddings/word_embeddings/embedding')) == 0.0
  assert optim.lr_multiplier(o, path('text_encoder/encoder/layer/0/output/dense/kernel')) == 0.1
  assert optim.lr_multiplier(o, path('neck/v2/Dense_0/kernel')) == 0.0
  assert optim.lr_multiplier(o, path('decoder/layer_0/mlp_in/kernel')) == 1.0


def swin_exempt_count(v, image_size):
  """Elements of the Swin's norms and relative-position tables, and of EAVL's vision_norm_2..4,
  from the config's sizes (stage i: width E 2^i, the window clipped to the stage's map)."""
  e = v.embed_dim
  count = 2 * e                                                 # patch embedding's norm
  for i, (depth, heads) in enumerate(zip(v.depths, v.num_heads)):
    dim, side = e * 2 ** i, image_size // v.patch_size // 2 ** i
    window = min(v.window_size, side)
    count += depth * (2 * 2 * dim + (2 * window - 1) ** 2 * heads)   # norm1, norm2, table
    if i:
      count += 2 * 2 * dim                                      # patch merging's norm (4 E 2^(i-1))
  return count + 2 * (2 * e + 4 * e + 8 * e)                    # vision_norm_2, _3, _4


def decayed_by_adamw(optim_config, params):
  """The parameters one AdamW update with zero gradients changes: those it decays."""
  tx, _ = optim.make_optimizer(optim_config, total_updates=10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  return {k for k, u in flat(updates).items() if np.any(u != 0)}


def test_weight_decay_exempts_what_the_config_says():
  config = tiny.get_config()
  config.optim.learning_rate = 1e-2
  params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype),
                        train_state.abstract_variables(config.model)['params'])
  sizes = {k: x.size for k, x in flat(params).items()}

  config.optim.weight_decay_exempt = 'lavt'
  exempt = set(sizes) - decayed_by_adamw(config.optim, params)
  assert sum(sizes[k] for k in exempt) == swin_exempt_count(config.model.vision_encoder,
                                                            config.model.image_size)
  assert all(k.startswith(('vision_encoder/', 'vision_norm_')) for k in exempt)
  assert 'vision_encoder/layers_0/blocks_0/attn/qkv/bias' not in exempt       # decays in LAVT
  assert 'text_encoder/encoder/layer/0/output/LayerNorm/scale' not in exempt  # BERT: all decays
  assert 'decoder/layer_0/norm1/scale' not in exempt                          # the head too

  config.optim.weight_decay_exempt = 'norms_and_biases'
  exempt = set(sizes) - decayed_by_adamw(config.optim, params)
  assert exempt == {k for k in sizes if k.rsplit('/', 1)[1] in ('bias', 'scale')
                    or 'relative_position_bias_table' in k}


def test_paper_configs_take_lavts_groups_and_the_from_scratch_configs_train_everything():
  paper = base.get_config().optim
  assert (paper.text_encoder_trainable_layers, paper.weight_decay_exempt) == (10, 'lavt')
  small = tiny.get_config().optim
  assert (small.text_encoder_trainable_layers, small.weight_decay_exempt) == (
      -1, 'norms_and_biases')


def test_frozen_parameters_get_no_update_under_optax_multisteps():
  """With gradient accumulation the multiplier still zeroes the update (weight decay included)."""
  config = tiny.get_config()
  config.optim.text_encoder_trainable_layers = 0
  config.optim.grad_accum_steps = 2
  params = {'text_encoder': {'embeddings': {'w': jnp.ones(3)}}, 'neck': {'kernel': jnp.ones(3)}}
  tx, _ = optim.make_optimizer(config.optim, total_updates=10)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert np.array_equal(params['text_encoder']['embeddings']['w'], np.ones(3))
  assert not np.array_equal(params['neck']['kernel'], np.ones(3))
