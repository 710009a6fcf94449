"""The whole EAVL network (issue 2): shapes, padding invariance, gradients, determinism, bad input."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base as base_config
from configs import tiny as tiny_config
from eavl_jax import losses
from eavl_jax.models import aligner
from eavl_jax.models import decoder
from eavl_jax.models import builder
from eavl_jax.models import neck
from eavl_jax.models import query_generator
from tests.model_inputs import random_batch


def tiny(**overrides):
  config = tiny_config.get_config()
  for key, value in overrides.items():
    target = config.model
    *path, leaf = key.split('.')
    for p in path:
      target = target[p]
    target[leaf] = value
  return config


def init(model, inputs, seed=0):
  return jax.jit(lambda key: model.init(key, *inputs, train=False)['params'])(jax.random.key(seed))


def apply(model, params, *inputs, **kwargs):
  return jax.jit(lambda p, *x: model.apply({'params': p}, *x, **kwargs))(params, *inputs)


# ------------------------------------------------------------------ shapes

def test_tiny_output_shapes():
  config = tiny()
  m = config.model
  model = builder.build_model(m)
  image, ids, mask, _ = random_batch(m, 2)
  params = init(model, (image, ids, mask))
  out = apply(model, params, image, ids, mask)
  q = m.image_size // 4
  assert out['logits'].shape == (2, q, q) and out['logits'].dtype == jnp.float32
  assert out['masks'].shape == (2, m.num_queries, q, q)
  assert out['scores'].shape == (2, m.num_queries)
  np.testing.assert_allclose(np.asarray(out['scores']).sum(-1), 1.0, rtol=1e-5)


def expected_intermediate_shapes(m, b, l):
  s, c, e = m.image_size, m.hidden_dim, m.vision_encoder.embed_dim
  h3 = s // 16
  return {
      'vision_encoder': [(b, s // 4, s // 4, e), (b, s // 8, s // 8, 2 * e),
                         (b, h3, h3, 4 * e), (b, s // 32, s // 32, 8 * e)],
      'attention_pool': [(b, s // 32, s // 32, 8 * e), (b, 8 * e)],
      'text_encoder': [(b, l, m.text_encoder.hidden_size)],
      'neck': [(b, h3, h3, c)],
      'query_generator': [(b, m.num_queries, c)],
      'decoder': [(b, h3, h3, c)],
  }


def intermediate_shapes(model, params, inputs):
  _, state = apply(model, params, *inputs, capture_intermediates=True, mutable=['intermediates'])
  return {name: [tuple(x.shape) for x in jax.tree.leaves(state['intermediates'][name]['__call__'])]
          for name in ('vision_encoder', 'attention_pool', 'text_encoder', 'neck',
                       'query_generator', 'decoder')}


def test_every_module_shape_tiny():
  m = tiny().model
  model = builder.build_model(m)
  inputs = random_batch(m, 2)[:3]
  params = init(model, inputs)
  assert intermediate_shapes(model, params, inputs) == expected_intermediate_shapes(m, 2, m.max_tokens)


@pytest.mark.slow
def test_every_module_shape_paper_config_abstractly():
  """The paper's setting (480², Swin-B, BERT-base, C=512, N_q=24) through jax.eval_shape only."""
  m = base_config.get_config().model
  model = builder.build_model(m)
  inputs = builder.dummy_inputs(m, 2)
  params = jax.eval_shape(lambda: init(model, inputs))
  out, state = jax.eval_shape(lambda p: model.apply(
      {'params': p}, *inputs, capture_intermediates=True, mutable=['intermediates']), params)
  got = {name: [tuple(x.shape) for x in jax.tree.leaves(state['intermediates'][name]['__call__'])]
         for name in ('vision_encoder', 'attention_pool', 'text_encoder', 'neck',
                      'query_generator', 'decoder')}
  assert got == expected_intermediate_shapes(m, 2, 17)
  assert got['vision_encoder'][2] == (2, 30, 30, 512) and got['neck'] == [(2, 30, 30, 512)]
  assert out['logits'].shape == (2, 120, 120)
  assert out['masks'].shape == (2, 24, 120, 120)
  assert out['scores'].shape == (2, 24)


def test_head_modules_standalone_shapes():
  """Each head module on its own, at shapes unlike the model's (traced with jax.eval_shape)."""
  b, c, n, l = 2, 16, 5, 7
  shaped = lambda module, *args: jax.eval_shape(
      lambda: module.apply(module.init(jax.random.key(0), *args), *args))
  f_v2, f_v3, f_v4 = (jnp.ones(s) for s in ((b, 16, 16, 8), (b, 8, 8, 12), (b, 4, 4, 20)))
  f_tg, f_vg = jnp.ones((b, 24)), jnp.ones((b, 20))
  assert shaped(neck.FusionNeck(c, 'none', False), f_v2, f_v3, f_v4, f_tg).shape == (b, 8, 8, c)
  assert shaped(neck.FusionNeck(c, 'none', False), f_v2, f_v3, f_v4).shape == (b, 8, 8, c)
  f_t, text_mask = jnp.ones((b, l, c)), jnp.ones((b, l), jnp.int32)
  assert shaped(query_generator.QueryGenerator(c, n, True, False, False, 'none', False), f_v2, f_v3, f_v4, f_vg, f_t,
                text_mask).shape == (b, n, c)
  f_vt, f_q = jnp.ones((b, 64, c)), jnp.ones((b, n, c))
  assert shaped(decoder.Decoder(2, 2, 32, 0.0, False), f_vt, f_q, 8, 8).shape == (b, 8, 8, c)
  assert shaped(decoder.Decoder(2, 2, 32, 0.0, True), f_vt, f_q, 8, 8).shape == (b, 8, 8, c)
  f_s = jnp.ones((b, 8, 8, c))
  for mode, nq in (('aligner', n), ('fixed', 1)):
    out = shaped(aligner.Aligner(c, mode, True, 2, 'none', 'none', 'auto'), f_s, f_q)
    assert out['logits'].shape == (b, 32, 32)
    assert out['masks'].shape == (b, nq, 32, 32) and out['scores'].shape == (b, nq)


# ------------------------------------------------------------------ dynamic convolution in the model

def test_aligner_hlo_holds_one_grouped_convolution_for_the_dynamic_kernels():
  b, c, n = 3, 16, 6
  al = aligner.Aligner(c, 'aligner', True, 2, 'none', 'none', 'vmap_conv')
  f_s, f_q = jnp.ones((b, 4, 4, c)), jnp.ones((b, n, c))
  params = al.init(jax.random.key(0), f_s, f_q)
  hlo = jax.jit(al.apply).lower(params, f_s, f_q).compile().as_text()
  convolutions = re.findall(r'= \S+ convolution\(.*', hlo)
  grouped = [x for x in convolutions if f'feature_group_count={b}' in x]
  assert len(grouped) == 1, convolutions          # the N_q dynamic kernels of all B samples
  assert len(convolutions) == 2, convolutions     # plus the mask features' own 3x3 conv
  assert 'while' not in hlo


def test_aligner_forms_agree():
  m = tiny().model
  outs = []
  for form in ('vmap_conv', 'shifted_matmul'):
    mf = tiny(**{'aligner.conv_impl': form}).model
    model = builder.build_model(mf)
    inputs = random_batch(m, 2)[:3]
    outs.append(apply(model, init(model, inputs), *inputs)['logits'])
  np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ padding invariance

def test_padding_to_17_or_22_tokens_gives_the_same_logits():
  m = tiny(max_tokens=22).model
  model = builder.build_model(m)
  image, _, _, _ = random_batch(m, 1)
  words = [101, 1996, 2235, 2417, 4418, 2187, 1997, 1996, 2630, 2675, 102]
  padded = {}
  for length in (17, 22):
    ids = np.zeros((1, length), np.int32)
    ids[0, :len(words)] = words
    mask = (ids > 0).astype(np.int32)
    padded[length] = (image, ids, mask)
  params = init(model, padded[22])
  a = apply(model, params, *padded[17])
  b = apply(model, params, *padded[22])
  np.testing.assert_allclose(np.asarray(a['logits']), np.asarray(b['logits']), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(a['scores']), np.asarray(b['scores']), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ gradients

ABLATIONS = {
    'paper': {},
    'one query': {'num_queries': 1},
    'fixed kernel': {'aligner.mode': 'fixed'},
    'no estimator': {'aligner.use_estimator': False},
    'no global text': {'neck.use_global_text': False},
    'no global vision': {'query_generator.use_global_vision': False},
    'relu kernels': {'aligner.kernel_activation': 'relu'},
    'relu mask features': {'aligner.feature_activation': 'relu'},
    'scaled word attention': {'query_generator.scale_word_attention': True},
    'normalised word attention': {'query_generator.scale_word_attention': True,
                                  'query_generator.normalize_word_attention': True},
    'batch norm head': {'head_norm': 'batch'},
    'layer norm head': {'head_norm': 'layer'},
    'gates open at init': {'gates_open_at_init': True},
    'gates open at init, batch norm': {'gates_open_at_init': True, 'head_norm': 'batch'},
}


@pytest.mark.parametrize('setting', ABLATIONS)
def test_every_parameter_of_the_setting_gets_a_gradient(setting):
  config = tiny(**ABLATIONS[setting])
  model = builder.build_model(config.model)
  image, ids, mask, gt = random_batch(config.model, 2, seed=3)
  variables = jax.jit(lambda key: model.init(key, image, ids, mask))(jax.random.key(1))
  params, stats = variables['params'], variables.get('batch_stats', {})

  def loss(p):   # a train step's forward: BatchNorm on the batch's statistics
    out, _ = model.apply({'params': p, 'batch_stats': stats}, image, ids, mask, train=True,
                         mutable=['batch_stats'])
    return losses.loss_fn(out['logits'], gt, config.loss)

  grads = jax.jit(jax.grad(loss))(params)   # one compile per setting: faster than eager ops
  if config.model.gates_open_at_init:
    # A gate that starts at 1 for every input (zero kernel, or a norm's zero scale) passes no
    # gradient to what feeds it at the first step; after one update it does.
    grads = jax.jit(jax.grad(loss))(jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  dead = {jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g) != 0)}
  # With one query the decoder's cross-attention has a single key: its softmax is 1 whatever the
  # query and key projections are, so those two (and nothing else) are unused by the maths.
  unused = set()
  if config.model.num_queries == 1:
    unused = {f"['decoder']['layer_{i}']['cross_attention']['{p}']['{w}']"
              for i in range(config.model.decoder.num_layers)
              for p in ('query', 'key') for w in ('kernel', 'bias')}
  # The estimator's score bias (eq. 13) is added to every query's score before the softmax over
  # the queries, which ignores a shift shared by all: its gradient is 0 up to rounding, and comes
  # out exactly 0 or +-1e-9 depending on the order of the float sums. It is checked in neither way.
  shift_invariant = {"['aligner']['estimator_score']['bias']"}
  assert dead - shift_invariant == unused, (
      f'{setting}: parameters without gradient: {sorted(dead - shift_invariant - unused)}')
  # The switches change which parameters exist: each ablation drops the parts it names.
  names = {jax.tree_util.keystr(path) for path, _ in flat}
  has = lambda part: any(part in n for n in names)
  assert has('estimator') == (config.model.aligner.use_estimator and config.model.num_queries > 1
                              and config.model.aligner.mode == 'aligner')
  assert has('kernel_generator') == (config.model.aligner.mode == 'aligner')
  assert has("'tg'") == config.model.neck.use_global_text
  assert has('global_vision') == config.model.query_generator.use_global_vision


# ------------------------------------------------------------------ jit determinism

def test_jitted_forward_backward_twice_gives_the_same_result():
  config = tiny()
  config.model.decoder.dropout = 0.1
  model = builder.build_model(config.model)
  image, ids, mask, gt = random_batch(config.model, 2, seed=5)
  params = init(model, (image, ids, mask))

  @jax.jit
  def step(p, key):
    def loss(p):
      logits = model.apply({'params': p}, image, ids, mask, train=True, rngs={'dropout': key})['logits']
      return losses.loss_fn(logits, gt, config.loss)
    return jax.value_and_grad(loss)(p)

  key = jax.random.key(7)
  (l1, g1), (l2, g2) = step(params, key), step(params, key)
  assert np.isfinite(float(l1)) and float(l1) == float(l2)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize('field,value,match', [
    ('image_size', 100, r'model\.image_size=100'),
    ('image_size', 0, r'model\.image_size=0'),
    ('num_queries', 0, r'model\.num_queries=0'),
    ('dtype', 'float16', r'model\.dtype=.float16'),
    ('aligner.mode', 'dynamic', r'model\.aligner\.mode=.dynamic'),
    ('aligner.conv_impl', 'fft', r'model\.aligner\.conv_impl=.fft'),
    ('aligner.kernel_activation', 'gelu', r'model\.aligner\.kernel_activation=.gelu'),
])
def test_bad_config_names_field_and_value(field, value, match):
  with pytest.raises(ValueError, match=match):
    builder.build_model(tiny(**{field: value}).model)


def test_bad_inputs_name_the_problem():
  m = tiny().model
  model = builder.build_model(m)
  image, ids, mask, _ = random_batch(m, 2)
  params = init(model, (image, ids, mask))
  with pytest.raises(ValueError, match=r'image has shape \(2, 96, 96, 3\).*image_size=64'):
    model.apply({'params': params}, np.zeros((2, 96, 96, 3), np.float32), ids, mask)
  with pytest.raises(ValueError, match='batch sizes do not match: image has 2, input_ids has 3'):
    model.apply({'params': params}, image, np.tile(ids, (2, 1))[:3], np.tile(mask, (2, 1))[:3])
  with pytest.raises(ValueError, match='attention_mask'):
    model.apply({'params': params}, image, ids, mask[:, :5])


def test_refs_per_image_equals_the_images_repeated_in_value_and_gradient():
  """K expressions per image: the image features computed once and repeated give the outputs and
  the train step's gradients of K copies of each image."""
  config = tiny()
  model = builder.build_model(config.model)
  image, ids, text_mask, mask = random_batch(config.model, 4)
  image = image[:2]                                     # 2 images, 2 expressions each
  repeated = np.repeat(image, 2, axis=0)
  params = init(model, (repeated, ids, text_mask))

  def loss_and_grads(k, images):
    def loss(p):
      out = model.apply({'params': p}, images, ids, text_mask, train=False, refs_per_image=k)
      return losses.loss_fn(out['logits'], mask, config.loss), out['logits']
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (loss_k, logits_k), grads_k = loss_and_grads(2, image)
  (loss_1, logits_1), grads_1 = loss_and_grads(1, repeated)
  np.testing.assert_allclose(logits_k, logits_1, atol=1e-5)
  np.testing.assert_allclose(loss_k, loss_1, rtol=1e-5)
  swin_1 = grads_1['vision_encoder']['patch_embed']['proj']['kernel']
  assert np.abs(swin_1).max() > 0
  for g_k, g_1 in zip(jax.tree.leaves(grads_k), jax.tree.leaves(grads_1)):
    np.testing.assert_allclose(g_k, g_1, atol=1e-5, rtol=1e-4)
  with pytest.raises(ValueError, match='image has 2, input_ids has 4, refs_per_image=3'):
    model.apply({'params': params}, image, ids, text_mask, refs_per_image=3)
