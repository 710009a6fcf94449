"""BERT text encoder: shapes, padding invariance, Hugging Face Flax parameter names."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from configs import tiny
from eavl_jax.models import bert


def _model(**kw):
  cfg = tiny.get_config().model.text_encoder
  return bert.from_config(cfg, remat=False, **kw)


@functools.lru_cache()
def _params():
  """One set of random parameters for every test (initialising op by op is slow on CPU)."""
  ids = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(_model().init, jax.random.PRNGKey(0), ids, ids)['params']
  rng = np.random.RandomState(0)
  return traverse_util.unflatten_dict({
      k: (float(k[-1] == 'scale') + 0.1 * rng.randn(*s.shape)).astype(np.float32)
      for k, s in traverse_util.flatten_dict(shapes).items()})


def test_shapes_and_param_names():
  model = _model()
  ids = jnp.ones((2, 12), jnp.int32)
  params = _params()
  assert model.apply({'params': params}, ids, ids).shape == (2, 12, 32)
  names = set(traverse_util.flatten_dict(params, sep='/'))
  expected = {'embeddings/word_embeddings/embedding', 'embeddings/position_embeddings/embedding',
              'embeddings/token_type_embeddings/embedding', 'embeddings/LayerNorm/scale',
              'embeddings/LayerNorm/bias'}
  for i in range(2):
    p = f'encoder/layer/{i}/'
    for d in ('attention/self/query', 'attention/self/key', 'attention/self/value',
              'attention/output/dense', 'intermediate/dense', 'output/dense'):
      expected |= {p + d + '/kernel', p + d + '/bias'}
    for n in ('attention/output/LayerNorm', 'output/LayerNorm'):
      expected |= {p + n + '/scale', p + n + '/bias'}
  assert names == expected
  assert params['encoder']['layer']['0']['intermediate']['dense']['kernel'].shape == (32, 64)


def test_padding_does_not_change_real_tokens():
  model = _model()
  sentence = np.array([101, 1037, 2158, 2006, 1996, 2157, 102], np.int32)  # 7 real tokens
  params = _params()
  def run(length):
    ids = np.zeros((1, length), np.int32)
    ids[0, :7] = sentence
    mask = (ids > 0).astype(np.int32)
    return model.apply({'params': params}, ids, mask)
  short, long = run(12), run(20)
  np.testing.assert_allclose(np.asarray(long)[0, :7], np.asarray(short)[0, :7], atol=1e-5)
  # and the mask is what makes it so: unmasked padding would change them
  ids = np.zeros((1, 20), np.int32)
  ids[0, :7] = sentence
  unmasked = model.apply({'params': params}, ids, np.ones_like(ids))
  assert not np.allclose(np.asarray(unmasked)[0, :7], np.asarray(short)[0, :7], atol=1e-3)


def test_dropout_only_when_training_and_remat_is_equal():
  cfg = tiny.get_config().model.text_encoder
  cfg.hidden_dropout_prob = 0.1
  cfg.attention_probs_dropout_prob = 0.1
  model = bert.from_config(cfg, remat=False)
  ids = jnp.arange(1, 9, dtype=jnp.int32)[None]
  mask = jnp.ones_like(ids)
  params = _params()
  run = lambda m, train, seed: m.apply({'params': params}, ids, mask, train=train,
                                       rngs={'dropout': jax.random.PRNGKey(seed)})
  np.testing.assert_array_equal(run(model, False, 1), run(model, False, 2))
  assert not np.allclose(run(model, True, 1), run(model, True, 2))
  remat = bert.from_config(cfg, remat=True)
  np.testing.assert_allclose(run(remat, True, 1), run(model, True, 1), atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
  model = _model(dtype=jnp.bfloat16)
  ids = jnp.ones((1, 5), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, ids)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
  assert model.apply({'params': _params()}, ids, ids).dtype == jnp.bfloat16
