"""The head against numpy references written from the paper's formulas (eq. 9-10, 11-12, 14), and
its BatchNorm (model.head_norm='batch'): batch statistics in training, running averages after."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny as tiny_config
from eavl_jax.models import aligner
from eavl_jax.models import builder
from eavl_jax.models import query_generator
from tests.test_dynamic_conv import loop_reference

relu = lambda x: np.maximum(x, 0)


def dense(params, x):
  return x @ np.asarray(params['kernel'], np.float64) + np.asarray(params['bias'], np.float64)


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def layer_norm(x, scale):
  """LayerNorm over the last axis, no bias, flax's epsilon."""
  centred = x - x.mean(-1, keepdims=True)
  return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(scale)


@pytest.mark.parametrize('use_global_vision', [True, False])
@pytest.mark.parametrize('scale,normalize', [(False, False), (True, False), (True, True)])
def test_word_attention_and_queries_equal_eq_9_10(use_global_vision, scale, normalize):
  """a_ni = σ(f_vdn W_vd) σ(f_tvi W_a)^T, softmax over the words (eq. 9; no 1/sqrt(C) unless
  `scale_word_attention`, q and k layer-normed if `normalize_word_attention`),
  F_qn = A_n σ(F_tv W_tv) (eq. 10), F_tv = σ(F_t W_t)·σ(F_vg W_vg) (eq. 8)."""
  b, c, n, l = 2, 16, 3, 6
  rng = np.random.default_rng(0)
  f_v2, f_v3, f_v4 = (rng.normal(size=s).astype(np.float32)
                      for s in ((b, 16, 16, 8), (b, 8, 8, 12), (b, 4, 4, 20)))
  f_vg, f_t = rng.normal(size=(b, 20)).astype(np.float32), rng.normal(size=(b, l, c)).astype(
      np.float32)
  text_mask = np.array([[1] * 6, [1] * 4 + [0] * 2], np.int32)
  module = query_generator.QueryGenerator(c, n, use_global_vision, scale, normalize, 'none', False)
  inputs = (f_v2, f_v3, f_v4, f_vg, f_t, text_mask)
  variables = module.init(jax.random.key(0), *inputs)
  if normalize:   # learned scales away from their initial 1, so that the test sees them
    for name in ('vd_norm', 'a_norm'):
      variables['params'][name]['scale'] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
  f_q, state = module.apply(variables, *inputs, capture_intermediates=True,
                            mutable=['intermediates'])
  p, inter = variables['params'], state['intermediates']

  dense_maps = np.asarray(inter['reduce_2']['__call__'][0], np.float64)    # (B, H3, W3, N_q)
  f_vd = dense_maps.reshape(b, -1, n).transpose(0, 2, 1)                   # eq. 7
  f_tv = f_t.astype(np.float64)
  if use_global_vision:
    f_tv = (relu(dense(p['text']['Dense_0'], f_tv))
            * relu(dense(p['global_vision']['Dense_0'], f_vg))[:, None])   # eq. 8
  q = relu(dense(p['vd']['Dense_0'], f_vd))                                 # (B, N_q, C)
  k = relu(dense(p['a']['Dense_0'], f_tv))                                  # (B, L, C)
  if normalize:
    q, k = layer_norm(q, p['vd_norm']['scale']), layer_norm(k, p['a_norm']['scale'])
  a = np.einsum('bnc,blc->bnl', q, k) / (np.sqrt(c) if scale else 1.0)     # eq. 9
  a = softmax(np.where(text_mask[:, None] > 0, a, -np.inf))
  want = np.einsum('bnl,blc->bnc', a, relu(dense(p['tv']['Dense_0'], f_tv)))  # eq. 10
  np.testing.assert_allclose(np.asarray(state['intermediates']['word_attention'][0]), a,
                             atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(f_q), want, atol=1e-5, rtol=1e-4)
  assert np.all(a[1, :, 4:] == 0)                                           # padding words


def conv3x3(x, params):
  """A 3x3 'same' convolution with bias, numpy: (B, H, W, Ci) -> (B, H, W, Co)."""
  kernel = np.asarray(params['kernel'], np.float64)                          # (3, 3, Ci, Co)
  h, w = x.shape[1:3]
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = sum(padded[:, i:i + h, j:j + w] @ kernel[i, j] for i in range(3) for j in range(3))
  return out + np.asarray(params['bias'], np.float64)


def up(x):
  """Up(.) of eq. 11: bilinear 2x (half-pixel centres), as the model defines it."""
  b, h, w, c = x.shape
  return np.asarray(jax.image.resize(jnp.asarray(x), (b, 2 * h, 2 * w, c), 'bilinear'),
                    np.float64)


@pytest.mark.parametrize('kernel_activation', ['none', 'relu'])
def test_masks_equal_eq_11_12_14(kernel_activation):
  """F_p = Up(Conv(Up(F_s))) with no activation (eq. 11); F_pn = σ(W_p F_qn), its first 9 C_p
  values a 3x3 kernel over F_p and the last its bias (eq. 11-12); y = Σ_n S_qn mask_n (eq. 14)."""
  b, c, n = 2, 8, 3
  rng = np.random.default_rng(1)
  f_s = rng.normal(size=(b, 4, 4, c)).astype(np.float32)
  f_q = rng.normal(size=(b, n, c)).astype(np.float32)
  module = aligner.Aligner(c, 'aligner', True, 2, kernel_activation, 'none', 'auto')
  variables = module.init(jax.random.key(0), f_s, f_q)
  out = module.apply(variables, f_s, f_q)
  p = variables['params']

  f_p = up(conv3x3(up(f_s.astype(np.float64)), p['mask_conv']))             # (B, 16, 16, C/2)
  assert f_p.min() < 0                                                      # no ReLU on F_p
  f_pn = dense(p['kernel_generator'], f_q)                                  # (B, N_q, 9 C_p + 1)
  f_pn = relu(f_pn) if kernel_activation == 'relu' else f_pn
  c_p = c // 2
  kernels = f_pn[..., :9 * c_p].reshape(b, n, 3, 3, c_p)
  masks = loop_reference(f_p, kernels, f_pn[..., 9 * c_p])                  # eq. 12
  np.testing.assert_allclose(np.asarray(out['masks']), masks, atol=1e-4, rtol=1e-4)
  scores = np.asarray(out['scores'], np.float64)
  np.testing.assert_allclose(scores.sum(-1), 1.0, atol=1e-6)                # eq. 13: softmax
  np.testing.assert_allclose(np.asarray(out['logits']), np.einsum('bn,bnhw->bhw', scores, masks),
                             atol=1e-4, rtol=1e-4)                           # eq. 14


# ------------------------------------------------------------------ BatchNorm in the head

def batch_norm_model():
  config = tiny_config.get_config()
  config.model.head_norm = 'batch'
  return config, builder.build_model(config.model)


def inputs(config, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  s, l = config.model.image_size, config.model.max_tokens
  image = rng.normal(size=(batch_size, s, s, 3)).astype(np.float32)
  ids = rng.integers(1000, 5000, size=(batch_size, l)).astype(np.int32)
  mask = np.ones((batch_size, l), np.int32)
  mask[:, 7:] = 0
  ids[:, 0], ids[:, 6] = 101, 102
  return image, ids * mask, mask


def test_batch_norm_trains_on_batch_statistics_and_evaluates_on_running_averages():
  config, model = batch_norm_model()
  x = inputs(config, 4)
  variables = jax.jit(lambda k: model.init(k, *x))(jax.random.key(0))
  stats = variables['batch_stats']
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(stats)[0]}
  assert any("'neck'" in n for n in names) and any("'query_generator'" in n for n in names)

  train = jax.jit(lambda v, *x: model.apply(v, *x, train=True, mutable=['batch_stats']))
  evaluate = jax.jit(lambda v, *x: model.apply(v, *x, train=False)['logits'])
  out, updated = train(variables, *x)
  for old, new in zip(jax.tree.leaves(stats), jax.tree.leaves(updated['batch_stats'])):
    assert not np.allclose(np.asarray(old), np.asarray(new))   # the running averages moved
  # Training: a sample's output depends on the other samples of the batch (their statistics).
  alone, _ = train(variables, *(a[:2] for a in x))
  assert not np.allclose(np.asarray(out['logits'][:2]), np.asarray(alone['logits']), atol=1e-4)
  # Evaluation: the running averages, so a sample's output is its own, and other averages give
  # other outputs.
  trained = {'params': variables['params'], 'batch_stats': updated['batch_stats']}
  full, first = evaluate(trained, *x), evaluate(trained, *(a[:2] for a in x))
  np.testing.assert_allclose(np.asarray(full[:2]), np.asarray(first), atol=1e-5, rtol=1e-5)
  assert not np.allclose(np.asarray(evaluate(variables, *x)), np.asarray(full), atol=1e-4)


def test_batch_norm_statistics_leave_padding_words_out():
  """The same expressions padded to 12 or to 20 tokens: the same training output and statistics.

  Batch statistics over 3 samples divide by small variances, which turns float rounding (BERT's
  [CLS] differs by ~1e-6 with the padding) into ~1e-4 differences; padding words counted in the
  statistics change the logits by ~4 (measured), so the tolerance still tells the two apart."""
  config, model = batch_norm_model()
  image, ids, mask = inputs(config, 3)
  longer = lambda a: np.pad(a, ((0, 0), (0, 8)))
  config.model.max_tokens = 20
  variables = jax.jit(lambda k: model.init(k, image, longer(ids), longer(mask)))(jax.random.key(0))
  train = jax.jit(lambda v, *x: model.apply(v, *x, train=True, mutable=['batch_stats']))
  (a, stats_a), (b, stats_b) = (train(variables, image, i, m)
                                for i, m in ((ids, mask), (longer(ids), longer(mask))))
  np.testing.assert_allclose(np.asarray(a['logits']), np.asarray(b['logits']), atol=5e-3,
                             rtol=1e-3)
  for x, y in zip(jax.tree.leaves(stats_a), jax.tree.leaves(stats_b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=5e-3, rtol=1e-3)


class _Iterator:
  """The data iterator's checkpoint contract (get_state / set_state), holding nothing."""

  def __init__(self):
    self.state = {'position': 0}

  def get_state(self):
    return self.state

  def set_state(self, state):
    self.state = state


def test_batch_norm_running_averages_are_checkpointed_and_restored(tmp_path):
  """A train step moves the running averages; the checkpoint holds them; both the resume restore
  and the evaluation restore give them back."""
  import optax  # pylint: disable=g-import-not-at-top
  from eavl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from eavl_jax import sharding  # pylint: disable=g-import-not-at-top
  from eavl_jax import train_state  # pylint: disable=g-import-not-at-top
  from eavl_jax import steps  # pylint: disable=g-import-not-at-top
  from tests import multidevice_worker  # pylint: disable=g-import-not-at-top
  config, model = batch_norm_model()
  config.train.global_batch_size = multidevice_worker.GLOBAL_BATCH
  mesh = sharding.make_mesh(config.mesh)
  tx = optax.sgd(0.1)
  state, shardings = train_state.create_train_state(config, model, tx, mesh)
  initial = jax.device_get(state.batch_stats)
  step = steps.jit_train_step(steps.make_train_step(
      model, tx, optax.constant_schedule(0.1), config,
      jax.tree.map(lambda _: False, state.params), mesh), shardings, mesh)
  batch = sharding.global_batch(multidevice_worker.global_batches(config)[0], mesh)
  state, _ = step(state, batch, jax.random.key(0))
  trained = jax.device_get(state.batch_stats)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(trained))]
  assert all(moved)

  manager = checkpointing.make_manager(str(tmp_path), config.train)
  checkpointing.save(manager, 1, state, _Iterator())
  manager.wait_until_finished()
  abstract, _ = train_state.abstract_train_state(config, model, tx, mesh)
  resumed, _ = checkpointing.restore(manager, 1, abstract, shardings, _Iterator())
  manager.close()
  variables, _ = checkpointing.restore_for_eval(config, str(tmp_path))
  for restored in (resumed.batch_stats, variables['batch_stats']):
    for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(trained)):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('norm', ['none', 'layer', 'batch'])
def test_gates_open_at_init_start_at_one_for_any_input(norm):
  """model.gates_open_at_init: σ(F_tg W_tg) (eq. 2) and σ(F_vg W_vg) (eq. 8) are 1 at init, so
  the gated features start as the ungated ones; the default init does not give that."""
  for open_gates in (True, False):
    config = tiny_config.get_config()
    config.model.head_norm, config.model.gates_open_at_init = norm, open_gates
    model = builder.build_model(config.model)
    x = inputs(config, 3)
    variables = jax.jit(lambda k, m=model: m.init(k, *x))(jax.random.key(0))
    _, state = jax.jit(lambda v, m=model: m.apply(
        v, *x, train=True, mutable=['batch_stats', 'intermediates'],
        capture_intermediates=True))(variables)
    gates = [np.asarray(state['intermediates']['neck']['tg']['__call__'][0]),
             np.asarray(state['intermediates']['query_generator']['global_vision']['__call__'][0])]
    assert all(np.all(g == 1.0) for g in gates) == open_gates
