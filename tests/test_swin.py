"""Swin backbone and attention pooling (eq. 1): shapes, padding, drop path, remat."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from eavl_jax.models import swin

TINY = dict(embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=4,
            patch_size=4, mlp_ratio=4.0, drop_path_rate=0.0, remat=False)


def random_params(model, *inputs):
  """Random values in the shapes `model.init` gives (initialising op by op is slow on CPU)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)['params']
  flat = traverse_util.flatten_dict(shapes)
  rng = np.random.RandomState(0)
  return traverse_util.unflatten_dict({
      k: (float(k[-1] == 'scale') + 0.1 * rng.randn(*s.shape)).astype(np.float32)
      for k, s in flat.items()})


@functools.lru_cache()
def _params():
  """One set of parameters for every test (they do not depend on the input size)."""
  return random_params(swin.SwinTransformer(**TINY), jnp.zeros((1, 16, 16, 3)))


def _run(model, size, train=False, batch=2, rng=1):
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3))
  params = _params()
  apply = jax.jit(model.apply, static_argnames='train')
  outs = apply({'params': params}, images, train=train, rngs={'dropout': jax.random.PRNGKey(rng)})
  return params, outs


def test_stage_shapes_and_param_names():
  params, outs = _run(swin.SwinTransformer(**TINY), 32)
  assert [o.shape for o in outs] == [(2, 8, 8, 16), (2, 4, 4, 32), (2, 2, 2, 64), (2, 1, 1, 128)]
  assert set(params) == {'patch_embed', 'layers_0', 'layers_1', 'layers_2', 'layers_3'}
  assert 'downsample' not in params['layers_0'] and 'downsample' in params['layers_1']
  block = params['layers_1']['blocks_1']
  assert block['attn']['relative_position_bias_table'].shape == (7 * 7, 2)
  assert block['attn']['qkv']['kernel'].shape == (32, 96)
  assert params['layers_1']['downsample']['reduction']['kernel'].shape == (64, 32)
  assert 'bias' not in params['layers_1']['downsample']['reduction']
  assert params['patch_embed']['proj']['kernel'].shape == (4, 4, 3, 16)


def test_sizes_that_need_padding_and_a_clamped_window():
  # 72²: maps 18, 9, 5, 3 — none a multiple of the window 4 (padded; the shifted blocks of
  # stages 1 and 2 roll, then pad); 3 < 4 (window clamped to 3, no shift).
  _, outs = _run(swin.SwinTransformer(**TINY), 72, batch=1)
  assert [o.shape for o in outs] == [(1, 18, 18, 16), (1, 9, 9, 32), (1, 5, 5, 64), (1, 3, 3, 128)]
  assert all(np.isfinite(np.asarray(o)).all() for o in outs)


def test_shift_mask_separates_wrapped_regions():
  mask = swin.shift_mask((8, 8), (4, 4), (2, 2))  # 4 windows of 16 tokens
  assert mask.shape == (4, 16, 16)
  assert (mask[0] == 0).all()  # the top-left window holds one region only
  # the bottom-right window holds 4 regions of 2x2 tokens: each token sees 4 of 16 tokens
  assert ((mask[3] == 0).sum(axis=1) == 4).all()


def test_relative_position_index_is_the_table_offset():
  index = swin.relative_position_index((3, 3), 4)  # clamped 3x3 window in a 7x7 table
  # token 0 = (0, 0), token 8 = (2, 2): offset (-2, -2) -> row 1, col 1 of the 7x7 table
  assert index[0, 8] == 1 * 7 + 1
  assert index[4, 4] == 3 * 7 + 3  # zero offset: the centre of the table


def test_drop_path_only_when_training_and_remat_is_equal():
  model = swin.SwinTransformer(**dict(TINY, drop_path_rate=0.5))
  _, eval_a = _run(model, 32)
  _, eval_b = _run(model, 32, rng=2)
  _, train_a = _run(model, 32, train=True, rng=1)
  _, train_b = _run(model, 32, train=True, rng=2)
  np.testing.assert_array_equal(eval_a[3], eval_b[3])
  assert not np.allclose(train_a[3], train_b[3])
  _, remat = _run(swin.SwinTransformer(**dict(TINY, drop_path_rate=0.5, remat=True)), 32,
                  train=True, rng=1)
  np.testing.assert_allclose(remat[3], train_a[3], atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  model = swin.SwinTransformer(**TINY, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
  _, outs = _run(model, 32)
  assert outs[0].dtype == jnp.bfloat16


def test_attention_pool_shapes_and_token_order():
  pool = swin.AttentionPool(num_heads=2)
  x4 = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 8))
  params = random_params(pool, x4)
  z, z_global = pool.apply({'params': params}, x4)
  assert z.shape == (2, 3, 3, 8) and z_global.shape == (2, 8)
  # no positions: permuting the tokens permutes z and leaves z̄ unchanged
  perm = np.random.RandomState(0).permutation(9)
  x4_perm = x4.reshape(2, 9, 8)[:, perm].reshape(2, 3, 3, 8)
  z_p, z_global_p = pool.apply({'params': params}, x4_perm)
  np.testing.assert_allclose(z_p.reshape(2, 9, 8), z.reshape(2, 9, 8)[:, perm], atol=1e-5)
  np.testing.assert_allclose(z_global_p, z_global, atol=1e-5)
