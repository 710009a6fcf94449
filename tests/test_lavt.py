"""LAVT (models/lavt.py) with its fixed head and with the aligner: module shapes, the pixel-word
attention and the language gate against numpy written from LAVT's formulas, padding words, the
gradients of both heads, its loss against torch, its Swin's padding order against Hugging Face's,
loading a checkpoint in LAVT's key layout, and train / evaluate / predict end to end."""
import argparse
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from scipy import special
import torch
import torch.nn.functional as F
import transformers

from benchmarks import ablations
from configs import lavt_aligner_refcoco
from configs import lavt_aligner_synthetic
from configs import lavt_refcoco
from configs import lavt_synthetic
from configs import synthetic
from configs import tiny as tiny_config
from eavl_jax import evaluate
from eavl_jax import losses
from eavl_jax import optim
from eavl_jax import predict
from eavl_jax import sharding
from eavl_jax import train_state
from eavl_jax import weights
from eavl_jax.models import builder
from eavl_jax.models import lavt
from eavl_jax.models import swin
from eavl_jax.weights import lavt as lavt_weights
from eavl_jax.weights import report
from tests.model_inputs import random_batch

HEAD_TREES = {'fixed': 'classifier', 'aligner': 'aligner_head'}


def tiny(head='fixed', **model_overrides):
  """configs/tiny.py as LAVT, its loss LAVT's."""
  c = tiny_config.get_config()
  c.model.name, c.model.lavt.head = 'lavt', head
  for key, value in model_overrides.items():
    target = c.model
    *path, leaf = key.split('.')
    for p in path:
      target = target[p]
    target[leaf] = value
  c.loss.name, c.loss.at_input_size = 'weighted_ce', True
  return c


def init_variables(model, inputs, seed=0):
  return jax.jit(lambda key: model.init(key, *inputs, train=False))(jax.random.key(seed))


# ------------------------------------------------------------------ numpy, from LAVT's formulas


def gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def instance_norm(x, eps=1e-5):   # InstanceNorm1d over the positions (axis 1) of (B, N, C)
  return (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + eps)


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def pwam_reference(x, words, word_mask, w, heads):
  """x (B,H,W,C), words (B,L,H_t), word_mask (B,L); w[name] = (matrix (in, out), bias)."""
  b, h, wd, c = x.shape
  x = x.reshape(b, h * wd, c).astype(np.float64)
  lin = lambda t, name: t @ w[name][0] + w[name][1]
  m = word_mask[:, :, None].astype(np.float64)                    # (B, L, 1)
  vis = gelu(lin(x, 'vis_project'))
  query = instance_norm(lin(x, 'query'))
  key, value = lin(words, 'key') * m, lin(words, 'value') * m
  d = c // heads
  out = np.zeros_like(query)
  for i in range(heads):
    part = slice(i * d, (i + 1) * d)
    sim = query[..., part] @ key[..., part].transpose(0, 2, 1) * c ** -0.5       # (B, HW, L)
    sim = sim + (1e4 * word_mask[:, None, :] - 1e4)   # LAVT: padding words pushed to -1e4
    out[..., part] = softmax(sim) @ value[..., part]
  lang = instance_norm(lin(out, 'out'))
  return gelu(lin(vis * lang, 'project_mm')).reshape(b, h, wd, c)


def flax_weights(params):
  return {name: (np.asarray(p['kernel'], np.float64), np.asarray(p['bias'], np.float64))
          for name, p in params.items()}


def pwam_inputs(seed=0, c=8, lengths=(6, 3)):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, 4, 5, c)).astype(np.float32)
  words = rng.normal(size=(2, 6, 12)).astype(np.float32)
  word_mask = (np.arange(6)[None] < np.array(lengths)[:, None]).astype(np.int32)
  return x, words, word_mask


# ------------------------------------------------------------------ modules


@pytest.mark.parametrize('heads', [1, 2])
def test_pixel_word_attention_matches_lavts_formula(heads):
  x, words, word_mask = pwam_inputs()
  module = lavt.PixelWordAttention(num_heads=heads, dropout=0.0)
  params = module.init(jax.random.key(0), x, words, word_mask)['params']
  got = module.apply({'params': params}, x, words, word_mask)
  assert got.shape == x.shape
  want = pwam_reference(x, words, word_mask, flax_weights(params), heads)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_padding_words_never_change_a_pixel_of_the_attention():
  x, words, word_mask = pwam_inputs(lengths=(4, 2))
  module = lavt.PixelWordAttention(num_heads=2, dropout=0.0)
  params = module.init(jax.random.key(0), x, words, word_mask)['params']
  other = np.where(word_mask[..., None] > 0, words, 100.0 * np.random.default_rng(1).normal(
      size=words.shape)).astype(np.float32)
  out = module.apply({'params': params}, x, words, word_mask)
  np.testing.assert_array_equal(np.asarray(module.apply({'params': params}, x, other, word_mask)),
                                np.asarray(out))


def test_language_gate_matches_its_formula():
  r = np.random.default_rng(2).normal(size=(2, 3, 4, 8)).astype(np.float32)
  module = lavt.LanguageGate()
  params = module.init(jax.random.key(0), r)['params']
  w1, w2 = (np.asarray(params[f'dense_{i}']['kernel'], np.float64) for i in (0, 1))
  assert set(params['dense_0']) == {'kernel'}   # no biases, as LAVT's res_gate
  want = np.tanh(np.maximum(r @ w1, 0.0) @ w2)
  got = module.apply({'params': params}, r)
  assert got.shape == r.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_resize_align_corners_matches_torch():
  x = np.random.default_rng(3).normal(size=(2, 3, 5, 4)).astype(np.float32)
  got = lavt.resize_align_corners(jnp.asarray(x), 7, 10)
  want = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=(7, 10), mode='bilinear',
                       align_corners=True).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_every_module_shape_both_heads():
  for head in lavt.HEADS:
    config = tiny(head)
    m = config.model
    model = builder.build_model(m)
    image, ids, mask, _ = random_batch(m, 2)
    # Shapes only: traced abstractly (jax.eval_shape), nothing compiled or run.
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), image, ids, mask, train=False))
    _, state = jax.eval_shape(lambda v: model.apply(v, image, ids, mask, capture_intermediates=True,
                                                    mutable=['intermediates']), variables)
    inter = state['intermediates']
    shape = lambda *path: inter_shape(inter, path)
    s, e, c = m.image_size, m.vision_encoder.embed_dim, m.hidden_dim
    for i in range(4):
      size, width = s // 2 ** (i + 2), e * 2 ** i
      assert shape(f'pwam_{i}') == (2, size, size, width)
      assert shape(f'output_norm_{i}') == (2, size, size, width)
      if i < 3:
        assert shape(f'gate_{i}') == (2, size, size, width)
    assert 'gate_3' not in inter   # stage 4's gated map feeds no stage
    assert shape('vision_encoder') == tuple((2, s // 2 ** (i + 2), s // 2 ** (i + 2), e * 2 ** i)
                                            for i in range(4))
    assert shape('text_encoder') == (2, m.max_tokens, m.text_encoder.hidden_size)
    assert shape('decoder') == (2, s // 4, s // 4, 4 * e)
    out = jax.eval_shape(lambda v: model.apply(v, image, ids, mask), variables)
    n_q = m.num_queries if head == 'aligner' else 1
    assert out['logits'].shape == (2, s // 4, s // 4)
    assert out['masks'].shape == (2, n_q, s // 4, s // 4) and out['scores'].shape == (2, n_q)
    if head == 'aligner':
      assert shape('aligner_head', 'query_generator') == (2, m.num_queries, c)
      assert shape('aligner_head', 'attention_pool') == ((2, s // 32, s // 32, 8 * e), (2, 8 * e))
    else:
      assert shape('classifier') == (2, s // 4, s // 4, 2)


def inter_shape(inter, path):
  node = inter
  for p in path:
    node = node[p]
  out = node['__call__'][0]
  return jax.tree.map(lambda x: tuple(x.shape), out, is_leaf=lambda x: hasattr(x, 'shape'))


def test_paper_sizes_abstractly():
  """configs/lavt_refcoco.py: the widths LAVT's Swin-B and decoder have."""
  for module, head in ((lavt_refcoco, 'classifier'), (lavt_aligner_refcoco, 'aligner_head')):
    config = module.get_config()
    config.model.text_encoder.pretrained = ''
    variables = train_state.abstract_variables(config.model)
    flat = report.flatten(variables['params'])
    assert flat['pwam_3/key/kernel'].shape == (768, 1024)
    assert flat['gate_2/dense_1/kernel'].shape == (512, 512) and 'gate_3' not in variables['params']
    assert flat['decoder/conv1_4/kernel'].shape == (3, 3, 1024 + 512, 512)
    assert flat['decoder/conv1_2/kernel'].shape == (3, 3, 512 + 128, 512)
    assert head in variables['params']
    assert report.flatten(variables['batch_stats'])['decoder/bn2_2/var'].shape == (512,)
  assert config.model.max_tokens == 20 and config.loss.name == 'weighted_ce'


def test_padding_words_never_change_the_prediction():
  for head in lavt.HEADS:
    config = tiny(head)
    model = builder.build_model(config.model)
    image, ids, mask, _ = random_batch(config.model, 2, seed=1)
    variables = init_variables(model, (image, ids, mask))
    run = jax.jit(lambda i, m: model.apply(variables, image, i, m)['logits'])
    base = run(ids, mask)
    rng = np.random.default_rng(5)
    noisy = np.where(mask > 0, ids, rng.integers(1000, 5000, size=ids.shape)).astype(np.int32)
    longer_ids = np.pad(noisy, ((0, 0), (0, 4)), constant_values=7)     # 4 more padding words
    longer_mask = np.pad(mask, ((0, 0), (0, 4)))
    np.testing.assert_allclose(run(noisy, mask), base, atol=1e-5)
    np.testing.assert_allclose(run(longer_ids, longer_mask), base, atol=1e-5)


def test_refs_per_image_equals_the_images_repeated():
  config = tiny('aligner')
  model = builder.build_model(config.model)
  image, ids, mask, _ = random_batch(config.model, 4, seed=2)
  variables = init_variables(model, (image, ids, mask))
  apply = jax.jit(model.apply, static_argnames='refs_per_image')   # faster than eager ops
  shared = apply(variables, image[::2], ids, mask, refs_per_image=2)['logits']
  repeated = apply(variables, np.repeat(image[::2], 2, axis=0), ids, mask)['logits']
  np.testing.assert_allclose(shared, repeated, atol=1e-6)


# Biases that cannot change the output (their gradient is 0 up to rounding), checked neither way:
# the instance norm after `query` and `out` removes any per-channel shift; a key bias adds the
# same q.b to every word's logit, which the softmax over the words ignores; the estimator's score
# bias is shared by every query (test_model.py).
SHIFT_INVARIANT = ({f"['pwam_{i}']['{p}']['bias']" for i in range(4)
                    for p in ('query', 'out', 'key')}
                   | {"['aligner_head']['aligner']['estimator_score']['bias']"})


def test_every_parameter_gets_a_gradient_and_the_heads_differ_only_in_their_own():
  names = {}
  for head in lavt.HEADS:
    config = tiny(head)
    model = builder.build_model(config.model)
    image, ids, mask, gt = random_batch(config.model, 2, seed=3)
    variables = init_variables(model, (image, ids, mask), seed=1)

    def loss(p):   # a train step's forward: BatchNorm on the batch's statistics
      out, _ = model.apply({'params': p, 'batch_stats': variables['batch_stats']}, image, ids,
                           mask, train=True, mutable=['batch_stats'])
      return losses.loss_fn(out['logits'], gt, config.loss)

    grads = jax.jit(jax.grad(loss))(variables['params'])
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = {jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g) != 0)}
    assert dead - SHIFT_INVARIANT == set(), f'{head}: no gradient: {sorted(dead)}'
    names[head] = {k: v.shape for k, v in report.flatten(variables['params']).items()}
  # Everything but the head is the same tree, names and shapes.
  rest = {head: {k: s for k, s in n.items() if not k.startswith(HEAD_TREES[head] + '/')}
          for head, n in names.items()}
  assert rest['fixed'] == rest['aligner']
  assert not any(k.startswith('aligner_head/') for k in names['fixed'])
  assert not any(k.startswith('classifier/') for k in names['aligner'])


@pytest.mark.parametrize('field, value, match', [
    ('name', 'vlt', "model.name='vlt'"),
    ('lavt.head', 'dense', "model.lavt.head='dense'"),
    ('lavt.fusion_heads', (3, 1, 1, 1), r'model.lavt.fusion_heads=\(3, 1, 1, 1\)'),
    ('aligner.mode', 'fixed', "model.aligner.mode='fixed' with model.name='lavt'"),
])
def test_bad_config_names_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    builder.build_model(tiny(**{field: value}).model)


# ------------------------------------------------------------------ loss, Swin order


def test_weighted_cross_entropy_is_torchs_with_class_weights():
  rng = np.random.default_rng(4)
  d = rng.normal(size=(3, 8, 8)).astype(np.float32) * 3        # object - background logit
  gt = (rng.random((3, 32, 32)) < 0.3).astype(np.uint8)
  config = tiny().loss
  up = F.interpolate(torch.tensor(d)[:, None], size=(32, 32), mode='bilinear',
                     align_corners=False)[:, 0]
  two = torch.stack([torch.zeros_like(up), up], 1)              # (B, 2, S, S): any shift is alike
  weight = torch.tensor([0.9, 1.1])
  target = torch.tensor(gt).long()
  want = F.cross_entropy(two, target, weight=weight).item()
  np.testing.assert_allclose(float(losses.loss_fn(jnp.asarray(d), jnp.asarray(gt), config)),
                             want, rtol=1e-5)
  per_sample = [F.cross_entropy(two[i:i + 1], target[i:i + 1], weight=weight).item()
                for i in range(3)]
  np.testing.assert_allclose(losses.per_sample_loss(jnp.asarray(d), jnp.asarray(gt), config),
                             per_sample, rtol=1e-5)
  config.name = 'focal'
  with pytest.raises(ValueError, match="loss.name='focal'"):
    losses.loss_fn(jnp.asarray(d), jnp.asarray(gt), config)


def test_lavts_loss_upsamples_with_the_corners_aligned_as_its_model():
  """model.name='lavt': the loss at the input size is LAVT's train.py criterion on its model's
  output, the (background, object) map upsampled by F.interpolate(align_corners=True); EAVL's
  model keeps half-pixel centres (the previous behaviour, to the bit)."""
  rng = np.random.default_rng(5)
  classes = rng.normal(size=(3, 2, 8, 8)).astype(np.float32) * 3   # (B, 2, S/4, S/4)
  gt = (rng.random((3, 32, 32)) < 0.3).astype(np.uint8)
  config = lavt_refcoco.get_config()
  assert losses.corners_aligned(config.model) and not losses.corners_aligned(synthetic.get_config().model)
  corners = losses.corners_aligned(config.model)
  output = F.interpolate(torch.tensor(classes), size=(32, 32), mode='bilinear', align_corners=True)
  want = F.cross_entropy(output, torch.tensor(gt).long(), weight=torch.tensor([0.9, 1.1])).item()
  d = jnp.asarray(classes[:, 1] - classes[:, 0])                  # the model's logit
  got = float(losses.loss_fn(d, jnp.asarray(gt), config.loss, corners))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  half = float(losses.loss_fn(d, jnp.asarray(gt), config.loss))
  assert abs(half - want) > 1e-3 * want                            # the other resize is not it
  # EAVL's loss at the input size: half-pixel centres, i.e. the loss of the logits resized by
  # jax.image.resize and taken where they already are (the ground truth's size).
  eavl_loss = synthetic.get_config().loss
  eavl_loss.at_input_size = True
  at_32 = eavl_loss.copy_and_resolve_references()
  at_32.at_input_size, at_32.target_resize = False, 'nearest'
  half_pixel = jax.image.resize(d, (3, 32, 32), 'linear', antialias=False)
  np.testing.assert_array_equal(losses.per_sample_loss(d, jnp.asarray(gt), eavl_loss),
                                losses.per_sample_loss(half_pixel, jnp.asarray(gt), at_32))


def test_pad_before_shift_is_the_order_of_hugging_face_and_lavt(tmp_path):
  """160²: stage maps 40, 20, 10, 5 with window 4; the last two are padded (12, 8), none clamped.
  pad_before_shift gives HF's maps (it pads, then rolls, as LAVT's Swin); timm's order does not
  where the padding is wider than the shift (LAVT's stage 4 at 480²: 15² padded to 24, shift
  6)."""
  sizes = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=4)
  flax_only = dict(patch_size=4, mlp_ratio=4.0, drop_path_rate=0.0, remat=False)  # HF's defaults
  hf_config = transformers.SwinConfig(image_size=160, patch_size=4, embed_dim=8,
                                      depths=[2, 2, 2, 2], num_heads=[1, 1, 2, 2], window_size=4)
  reference = transformers.SwinModel(hf_config).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in reference.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.ndim == 1 else p.shape[-1] ** -0.5)
              + (1.0 if 'norm' in name and name.endswith('weight') else 0.0))
  reference.save_pretrained(str(tmp_path))
  expected = jax.eval_shape(swin.SwinTransformer(**sizes, **flax_only).init, jax.random.key(0),
                            jnp.zeros((1, 32, 32, 3)))['params']
  params = weights.load_swin(str(tmp_path), expected)
  image = np.random.RandomState(0).randn(1, 160, 160, 3).astype(np.float32)
  with torch.no_grad():
    out = reference(torch.from_numpy(image).permute(0, 3, 1, 2), output_hidden_states=True,
                    output_hidden_states_before_downsampling=True)
  want = [out.reshaped_hidden_states[i + 1].permute(0, 2, 3, 1).numpy() for i in range(4)]
  pad_first = swin.SwinTransformer(**sizes, **flax_only, pad_before_shift=True).apply(
      {'params': params}, image)
  timm_order = swin.SwinTransformer(**sizes, **flax_only).apply({'params': params}, image)
  for i in range(4):
    np.testing.assert_allclose(np.asarray(pad_first[i]), want[i], atol=1e-4, err_msg=f'stage {i}')
  # 10² padded to 12 by 2 = the shift: both orders group the same pixels. 5² padded to 8 by 3 > 2:
  # timm's order puts wrapped and unwrapped pixels in one region, LAVT's / HF's does not.
  np.testing.assert_allclose(np.asarray(timm_order[2]), want[2], atol=1e-4)
  assert np.abs(np.asarray(timm_order[3]) - want[3]).max() > 1e-2


def lavt_swin_block(x, p, heads, window_size, shift_size):
  """LAVT-RIS lib/backbone.py's SwinTransformerBlock (with MMBasicLayer's shift mask), in numpy
  float64 on the flax block's parameters: the window and the shift as configured whatever the
  map's size; the map padded at the bottom / right to a multiple of the window, then rolled.
  x (B, H, W, C) -> (B, H, W, C)."""
  f = lambda a: np.asarray(a, np.float64)
  norm = lambda y, q: ((y - y.mean(-1, keepdims=True))
                       / np.sqrt(y.var(-1, keepdims=True) + 1e-5)) * f(q['scale']) + f(q['bias'])
  dense = lambda y, q: y @ f(q['kernel']) + f(q['bias'])
  b, h, w, c = x.shape
  ws = window_size
  shortcut, y = x, norm(x, p['norm1'])
  pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
  y = np.pad(y, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
  hp, wp = h + pad_b, w + pad_r
  partition = lambda t: t.reshape(t.shape[0], hp // ws, ws, wp // ws, ws, -1).transpose(
      0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, t.shape[-1])
  mask = None
  if shift_size > 0:
    y = np.roll(y, (-shift_size, -shift_size), axis=(1, 2))
    img_mask = np.zeros((1, hp, wp, 1))
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift_size), slice(-shift_size, None)):
      for wsl in (slice(0, -ws), slice(-ws, -shift_size), slice(-shift_size, None)):
        img_mask[:, hs, wsl, :] = cnt
        cnt += 1
    mask_windows = partition(img_mask)[..., 0]                           # (nW, N)
    mask = mask_windows[:, None, :] - mask_windows[:, :, None]
    mask = np.where(mask != 0, -100.0, 0.0)
  xw = partition(y)                                                      # (B nW, N, C)
  n, d = ws * ws, c // heads
  coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing='ij')).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
  index = rel[..., 0] * (2 * ws - 1) + rel[..., 1]                       # (N, N)
  bias = f(p['attn']['relative_position_bias_table'])[index.reshape(-1)].reshape(n, n, heads)
  qkv = dense(xw, p['attn']['qkv']).reshape(-1, n, 3, heads, d).transpose(2, 0, 3, 1, 4)
  q, k, v = qkv[0] * d ** -0.5, qkv[1], qkv[2]
  attn = q @ k.transpose(0, 1, 3, 2) + bias.transpose(2, 0, 1)[None]    # (B nW, h, N, N)
  if mask is not None:
    nw = mask.shape[0]
    attn = (attn.reshape(-1, nw, heads, n, n) + mask[None, :, None]).reshape(-1, heads, n, n)
  attn = np.exp(attn - attn.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  out = dense((attn @ v).transpose(0, 2, 1, 3).reshape(-1, n, c), p['attn']['proj'])
  out = out.reshape(b, hp // ws, wp // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      b, hp, wp, c)
  if shift_size > 0:
    out = np.roll(out, (shift_size, shift_size), axis=(1, 2))
  x = shortcut + out[:, :h, :w]
  hidden = dense(norm(x, p['norm2']), p['mlp']['fc1'])
  hidden = hidden * 0.5 * (1 + special.erf(hidden / np.sqrt(2)))
  return x + dense(hidden, p['mlp']['fc2'])


@pytest.mark.parametrize('size', [5, 7, 9, 16])
def test_swin_pads_small_maps_up_to_the_window_and_keeps_the_shift_as_lavts(size):
  """Window 7 (shift 3): maps of 5² and 7² are not larger than the window, where timm's rule
  (EAVL's) shrinks the window and drops the shift; LAVT pads up to the window and keeps the shift
  and its mask (pad_small_maps=True, what model.name='lavt' builds). 9² and 16²: larger maps,
  the same for both rules of the small maps."""
  rng = np.random.default_rng(size)
  x = rng.normal(size=(2, size, size, 8)).astype(np.float32)
  block = lambda **kw: swin.SwinBlock(num_heads=2, window_size=7, shifted=True, mlp_ratio=2.0,
                                      drop_path=0.0, pad_before_shift=True, **kw)
  params = block(pad_small_maps=True).init(jax.random.key(size), jnp.asarray(x))['params']
  params = jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape).astype(np.float32), params)
  want = lavt_swin_block(x.astype(np.float64), params, 2, 7, 3)
  lavt_rule = np.asarray(block(pad_small_maps=True).apply({'params': params}, x))
  np.testing.assert_allclose(lavt_rule, want, atol=1e-4)
  timm_rule = np.asarray(block().apply({'params': params}, x))
  if size <= 7:
    assert np.abs(timm_rule - want).max() > 1e-2
  else:
    np.testing.assert_allclose(timm_rule, lavt_rule, atol=1e-5)


def test_lavt_builds_its_swin_with_lavts_rules(monkeypatch):
  """model.name='lavt' builds the Swin with pad_before_shift and pad_small_maps (LAVT's); EAVL
  with neither (timm's)."""
  built = {}
  original = swin.SwinTransformer

  def recording(*args, **kwargs):
    built[kwargs.get('name')] = {k: kwargs.get(k, False)
                                 for k in ('pad_before_shift', 'pad_small_maps')}
    return original(*args, **kwargs)
  monkeypatch.setattr(swin, 'SwinTransformer', recording)
  for name, config in (('lavt', tiny()), ('eavl', tiny_config.get_config())):
    built.clear()
    model = builder.build_model(config.model)
    jax.eval_shape(model.init, jax.random.key(0), *random_batch(config.model, 1)[:3])
    assert list(built.values()) == [{'pad_before_shift': name == 'lavt',
                                     'pad_small_maps': name == 'lavt'}], name


# ------------------------------------------------------------------ a checkpoint in LAVT's layout


def lavt_state_dicts(model_config, seed=0):
  """The 'model' and 'bert_model' state dicts LAVT-RIS's train.py saves, for this config's sizes:
  named and shaped as its modules make them (the official Swin with patch merging at the end of a
  stage, Conv1d / Linear / Conv2d / BatchNorm2d weights, buffers), random values."""
  rng = np.random.default_rng(seed)
  t = lambda *shape: torch.tensor(rng.normal(size=shape).astype(np.float32) * 0.3)
  v, lang = model_config.vision_encoder, model_config.text_encoder.hidden_size
  e, ws = v.embed_dim, v.window_size
  sd = {'backbone.patch_embed.proj.weight': t(e, 3, 4, 4), 'backbone.patch_embed.proj.bias': t(e),
        'backbone.patch_embed.norm.weight': t(e), 'backbone.patch_embed.norm.bias': t(e)}
  norm = lambda name, c: {f'{name}.weight': t(c), f'{name}.bias': t(c)}
  linear = lambda name, o, i: {f'{name}.weight': t(o, i), f'{name}.bias': t(o)}
  for i, (depth, heads) in enumerate(zip(v.depths, v.num_heads)):
    c, pre = e * 2 ** i, f'backbone.layers.{i}'
    for j in range(depth):
      b = f'{pre}.blocks.{j}'
      sd.update({**norm(f'{b}.norm1', c), **norm(f'{b}.norm2', c),
                 f'{b}.attn.relative_position_bias_table': t((2 * ws - 1) ** 2, heads),
                 f'{b}.attn.relative_position_index': torch.zeros(ws * ws, ws * ws).long(),
                 **linear(f'{b}.attn.qkv', 3 * c, c), **linear(f'{b}.attn.proj', c, c),
                 **linear(f'{b}.mlp.fc1', 4 * c, c), **linear(f'{b}.mlp.fc2', c, 4 * c)})
    for name, c_in in (('vis_project.0', c), ('image_lang_att.f_key.0', lang),
                       ('image_lang_att.f_query.0', c), ('image_lang_att.f_value.0', lang),
                       ('image_lang_att.W.0', c), ('project_mm.0', c)):
      sd.update({f'{pre}.fusion.{name}.weight': t(c, c_in, 1), f'{pre}.fusion.{name}.bias': t(c)})
    sd.update({f'{pre}.res_gate.0.weight': t(c, c), f'{pre}.res_gate.2.weight': t(c, c),
               **norm(f'backbone.norm{i}', c)})
    if i < 3:
      sd.update({f'{pre}.downsample.reduction.weight': t(2 * c, 4 * c),
                 **norm(f'{pre}.downsample.norm', 4 * c)})
  hidden = 4 * e
  for k, c_in in ((4, 12 * e), (3, hidden + 2 * e), (2, hidden + e)):
    sd[f'classifier.conv1_{k}.weight'] = t(hidden, c_in, 3, 3)
    sd[f'classifier.conv2_{k}.weight'] = t(hidden, hidden, 3, 3)
    for j in (1, 2):
      bn = f'classifier.bn{j}_{k}'
      sd.update({**norm(bn, hidden), f'{bn}.running_mean': t(hidden),
                 f'{bn}.running_var': torch.tensor(rng.uniform(0.5, 2.0, hidden),
                                                   dtype=torch.float32),
                 f'{bn}.num_batches_tracked': torch.tensor(7)})
  sd.update({'classifier.conv1_1.weight': t(2, hidden, 1, 1), 'classifier.conv1_1.bias': t(2)})
  tc = model_config.text_encoder
  bert = transformers.BertModel(transformers.BertConfig(
      vocab_size=tc.vocab_size, hidden_size=lang, num_hidden_layers=tc.num_hidden_layers,
      num_attention_heads=tc.num_attention_heads, intermediate_size=tc.intermediate_size,
      max_position_embeddings=tc.max_position_embeddings), add_pooling_layer=False)
  bert_sd = {k: t(*p.shape) for k, p in bert.state_dict().items()}   # LAVT: pooler = None
  return sd, bert_sd


def write_checkpoint(path, sd, bert_sd):
  torch.save({'model': sd, 'bert_model': bert_sd, 'optimizer': {'state': {}, 'param_groups': []},
              'epoch': 39, 'args': argparse.Namespace(model='lavt', swin_type='base'),
              'lr_scheduler': {'last_epoch': 3}}, path)


DROPPED = ('relative_position_index', 'num_batches_tracked', 'position_ids',
           'backbone.layers.3.res_gate.')


def fingerprint(x):
  return tuple(np.round(np.sort(np.asarray(x, np.float32).ravel()), 5))


def test_every_key_of_a_lavt_checkpoint_lands(tmp_path):
  config = tiny('fixed')
  model = builder.build_model(config.model)
  image, ids, mask, _ = random_batch(config.model, 2)
  variables = jax.device_get(init_variables(model, (image, ids, mask)))
  sd, bert_sd = lavt_state_dicts(config.model)
  path = str(tmp_path / 'lavt_refcoco.pth')
  write_checkpoint(path, sd, bert_sd)
  loaded = lavt_weights.load_lavt(path, variables, config.model)

  # Every kept tensor of the file is exactly one leaf of the model, and every leaf is filled.
  leaves = {f'{col}/{k}': v for col in ('params', 'batch_stats')
            for k, v in report.flatten(loaded[col]).items()}
  by_values = {fingerprint(v): k for k, v in leaves.items()}
  assert len(by_values) == len(leaves)
  kept = {f'bert_model.{k}': v for k, v in bert_sd.items()}
  kept.update({k: v for k, v in sd.items() if not any(d in k for d in DROPPED)})
  landed = {name: by_values.get(fingerprint(v)) for name, v in kept.items()}
  assert None not in landed.values(), [n for n, k in landed.items() if k is None]
  assert sorted(landed.values()) == sorted(leaves)
  for name, leaf in landed.items():
    assert np.prod(leaves[leaf].shape) == kept[name].numel(), name
  # Names, and the layouts the numerics below rely on.
  w = sd['backbone.layers.1.fusion.image_lang_att.f_key.0.weight'].numpy()
  np.testing.assert_array_equal(leaves['params/pwam_1/key/kernel'], w[:, :, 0].T)
  merging = leaves['params/vision_encoder/layers_1/downsample/reduction/kernel']   # moved a stage
  np.testing.assert_array_equal(merging,
                                sd['backbone.layers.0.downsample.reduction.weight'].numpy().T)
  np.testing.assert_array_equal(leaves['batch_stats/decoder/bn1_4/var'],
                                sd['classifier.bn1_4.running_var'].numpy())
  np.testing.assert_array_equal(leaves['params/text_encoder/encoder/layer/1/output/dense/kernel'],
                                bert_sd['encoder.layer.1.output.dense.weight'].numpy().T)

  # The loaded PWAM of stage 2 is LAVT's formula with the file's (torch-layout) weights.
  x, words, word_mask = pwam_inputs(c=4 * config.model.vision_encoder.embed_dim)
  words = np.random.default_rng(9).normal(size=(2, 6, config.model.text_encoder.hidden_size))
  torch_weights = {
      name: (sd[f'backbone.layers.2.fusion.{src}.weight'].numpy()[:, :, 0].T,
             sd[f'backbone.layers.2.fusion.{src}.bias'].numpy())
      for name, src in (('vis_project', 'vis_project.0'), ('query', 'image_lang_att.f_query.0'),
                        ('key', 'image_lang_att.f_key.0'), ('value', 'image_lang_att.f_value.0'),
                        ('out', 'image_lang_att.W.0'), ('project_mm', 'project_mm.0'))}
  got = lavt.PixelWordAttention(num_heads=1, dropout=0.0).apply(
      {'params': loaded['params']['pwam_2']}, x, words.astype(np.float32), word_mask)
  np.testing.assert_allclose(np.asarray(got), pwam_reference(x, words, word_mask, torch_weights, 1),
                             rtol=1e-4, atol=1e-4)
  check_decoder_against_torch(loaded, sd, config.model.vision_encoder.embed_dim)


def check_decoder_against_torch(loaded, sd, e):
  """The loaded decoder and classifier (evaluation: running averages) against torch's functional
  ops on the file's weights, as LAVT's SimpleDecoding computes them."""
  rng = np.random.default_rng(11)
  ys = [rng.normal(size=(1, 16 >> i, 16 >> i, e << i)).astype(np.float32) for i in range(4)]
  dec = lavt.SimpleDecoder(4 * e)
  features = dec.apply({'params': loaded['params']['decoder'],
                        'batch_stats': loaded['batch_stats']['decoder']}, *ys)
  classes = jax.lax.conv_general_dilated(
      features, loaded['params']['classifier']['kernel'], (1, 1), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + loaded['params']['classifier']['bias']
  t = lambda a: torch.tensor(a).permute(0, 3, 1, 2)
  x = t(ys[3])
  for k, skip in ((4, t(ys[2])), (3, t(ys[1])), (2, t(ys[0]))):
    x = F.interpolate(x, size=skip.shape[-2:], mode='bilinear', align_corners=True)
    x = torch.cat([x, skip], 1)
    for j in (1, 2):
      x = F.conv2d(x, sd[f'classifier.conv{j}_{k}.weight'], padding=1)
      bn = f'classifier.bn{j}_{k}'
      x = F.relu(F.batch_norm(x, sd[f'{bn}.running_mean'], sd[f'{bn}.running_var'],
                              sd[f'{bn}.weight'], sd[f'{bn}.bias'], training=False, eps=1e-5))
  want = F.conv2d(x, sd['classifier.conv1_1.weight'], sd['classifier.conv1_1.bias'])
  np.testing.assert_allclose(np.asarray(classes), want.permute(0, 2, 3, 1).numpy(), rtol=1e-4,
                             atol=1e-3)


def test_missing_and_unexpected_keys_are_reported(tmp_path):
  config = tiny('fixed')
  model = builder.build_model(config.model)
  image, ids, mask, _ = random_batch(config.model, 2)
  variables = jax.device_get(init_variables(model, (image, ids, mask)))
  sd, bert_sd = lavt_state_dicts(config.model)
  del sd['backbone.layers.2.fusion.project_mm.0.bias']
  sd['backbone.layers.2.fusion.extra.0.weight'] = torch.zeros(3, 3, 1)
  path = str(tmp_path / 'edited.pth')
  write_checkpoint(path, sd, bert_sd)
  with pytest.raises(ValueError) as error:
    lavt_weights.load_lavt(path, variables, config.model)
  message = str(error.value)
  assert 'missing 1' in message and 'params/pwam_2/project_mm/bias' in message
  assert 'unexpected 1' in message and 'backbone.layers.2.fusion.extra.0.weight' in message
  config.model.allow_missing_keys = config.model.allow_unexpected_keys = True
  loaded = lavt_weights.load_lavt(path, variables, config.model)
  np.testing.assert_array_equal(loaded['params']['pwam_2']['project_mm']['bias'],
                                variables['params']['pwam_2']['project_mm']['bias'])   # kept


def test_aligner_head_loads_all_but_the_classifier_through_the_train_state(tmp_path):
  """model.lavt.pretrained at initialisation; head='aligner': the file's classifier is dropped,
  the aligner head keeps its initial values, everything else (BatchNorm averages too) is loaded."""
  config = tiny('aligner')
  sd, bert_sd = lavt_state_dicts(config.model)
  path = str(tmp_path / 'lavt.pth')
  write_checkpoint(path, sd, bert_sd)
  model = builder.build_model(config.model)
  tx, _ = optim.make_optimizer(config.optim, 10)
  mesh = sharding.make_mesh(config.mesh)
  fresh, _ = train_state.create_train_state(config, model, tx, mesh)
  config.model.lavt.pretrained = path
  state, _ = train_state.create_train_state(config, model, tx, mesh)
  params, fresh_params = jax.device_get(state.params), jax.device_get(fresh.params)
  for k, v in report.flatten(params['aligner_head']).items():
    np.testing.assert_array_equal(v, report.flatten(fresh_params['aligner_head'])[k])
  np.testing.assert_array_equal(params['gate_0']['dense_1']['kernel'],
                                sd['backbone.layers.0.res_gate.2.weight'].numpy().T)
  np.testing.assert_array_equal(jax.device_get(state.batch_stats)['decoder']['bn2_3']['mean'],
                                sd['classifier.bn2_3.running_mean'].numpy())


# ------------------------------------------------------------------ configs, end to end


def test_configs():
  c = lavt_refcoco.get_config()
  assert (c.model.name, c.model.lavt.head, c.model.image_size, c.model.max_tokens) == (
      'lavt', 'fixed', 480, 20)
  assert (c.optim.name, c.optim.learning_rate, c.optim.weight_decay, c.optim.decay_power) == (
      'adamw', 5e-5, 0.01, 0.9)
  assert (c.train.num_epochs, c.train.global_batch_size, c.loss.name) == (40, 32, 'weighted_ce')
  assert lavt_aligner_refcoco.get_config().model.lavt.head == 'aligner'
  for module, head in ((lavt_synthetic, 'fixed'), (lavt_aligner_synthetic, 'aligner')):
    got, want = module.get_config(), synthetic.get_config()
    assert (got.model.name, got.model.lavt.head) == ('lavt', head)
    got.model.name, got.model.lavt.head = 'eavl', 'fixed'
    assert got.to_dict() == want.to_dict()   # the synthetic recipe, nothing else changed
  # The other data sets of LAVT's README: lavt_refcoco.py but the data set and its splits (LAVT's
  # ReferDataset keeps 20 tokens on every data set).
  for dataset, splits in (('refcocop', ('val', 'testA', 'testB')),
                          ('refcocog_umd', ('val', 'test')), ('refcocog_google', ('val',))):
    got = importlib.import_module(f'configs.lavt_{dataset}').get_config()
    assert (got.data.dataset, tuple(got.data.eval_splits)) == (dataset, splits)
    assert set(evaluate.LAVT_README[dataset]) == set(splits)
    got.data.dataset, got.data.eval_splits = 'refcoco', c.data.eval_splits
    assert got.to_dict() == c.to_dict()


@pytest.mark.slow
def test_train_evaluate_predict_end_to_end(synthetic_records, tmp_path):
  """The table V rows of benchmarks/ablations.py, 2 steps each on the tiny config (LAVT's loss),
  validated; then `evaluate` and `predict` on the checkpoint of the row lavt."""
  config = tiny_config.get_config()
  config.data.data_dir = synthetic_records
  config.data.eval_max_size = 128
  config.train.num_steps = 2
  config.loss.name, config.loss.at_input_size = 'weighted_ce', True
  workdir = str(tmp_path / 'grid')
  summary = ablations.run_grid(config, workdir, ['lavt', 'lavt_aligner'], [0])
  for row in ('lavt', 'lavt_aligner'):
    run = summary['rows'][row]['runs']['0']
    assert run['steps'] == 2 and 0 <= run['mIoU'] <= 1, run
  run_config = ablations.row_config(config, 'lavt', 0)
  run_dir = ablations.run_dir(workdir, 'lavt', 0)
  step, results, _ = evaluate.run(run_config, run_dir, splits=['val'])
  assert step == 2 and 0 <= results['val']['oIoU'] <= 1 and results['val']['samples'] > 0
  image = str(tmp_path / 'scene.png')
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).save(image)
  result, written = predict.run(run_config, run_dir, image, 'the red circle',
                                str(tmp_path / 'out.png'))
  assert result['mask'].shape == (40, 60) and written == [str(tmp_path / 'out.png')]
  assert os.path.exists(written[0])


# ------------------------------------------------------------------ a released file, evaluated


def released_files(tmp_path, sd, bert_sd):
  """The layouts LAVT-RIS writes: {'model', 'bert_model', ...} (--model lavt), BERT inside
  'model' under 'text_encoder.' (--model lavt_one), and each with DDP's 'module.' prefix."""
  rest = {'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 39,
          'lr_scheduler': {'last_epoch': 3}}
  one = {**sd, **{f'text_encoder.{k}': v for k, v in bert_sd.items()}}
  module = lambda d: {f'module.{k}': v for k, v in d.items()}
  layouts = {
      'lavt': {'model': sd, 'bert_model': bert_sd, 'args': argparse.Namespace(model='lavt')},
      'lavt_one': {'model': one, 'args': argparse.Namespace(model='lavt_one')},
      'lavt_module': {'model': module(sd), 'bert_model': module(bert_sd),
                      'args': argparse.Namespace(model='lavt')},
      'lavt_one_module': {'model': module(one), 'args': argparse.Namespace(model='lavt_one')}}
  paths = {}
  for name, state in layouts.items():
    paths[name] = str(tmp_path / f'{name}.pth')
    torch.save({**state, **rest}, paths[name])
  return paths


def test_released_files_of_both_layouts_evaluate_alike(synthetic_records, tmp_path):
  """`python -m eavl_jax.evaluate --released`: the file model.lavt.pretrained names, in any of
  LAVT's layouts, gives the same variables (every leaf from the file) and the same numbers; the
  JSON names the file and the scoring."""
  config = tiny('fixed')
  config.data.data_dir, config.data.eval_max_size = synthetic_records, 128
  config.eval.protocol = 'lavt'
  sd, bert_sd = lavt_state_dicts(config.model, seed=3)
  paths = released_files(tmp_path, sd, bert_sd)
  mesh = sharding.make_mesh(config.mesh)
  loaded = {}
  for name, path in paths.items():
    config.model.lavt.pretrained = path
    loaded[name] = jax.device_get(evaluate.released_variables(config, mesh))
  want = report.flatten(loaded['lavt'])
  np.testing.assert_array_equal(want['params/classifier/bias'], sd['classifier.conv1_1.bias'])
  np.testing.assert_array_equal(
      want['params/text_encoder/encoder/layer/1/output/dense/kernel'],
      bert_sd['encoder.layer.1.output.dense.weight'].numpy().T)
  for name in paths:
    got = report.flatten(loaded[name])
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f'{name}: {k}')

  config.model.lavt.pretrained = paths['lavt_one_module']
  step, results, json_file = evaluate.run(config, str(tmp_path / 'run'), splits=['val'],
                                          released=True)
  assert step == evaluate.RELEASED_STEP and results['val']['samples'] > 0
  with open(json_file) as f:
    saved = json.load(f)
  assert saved['checkpoint'] == paths['lavt_one_module'] and saved['step'] == 'released'
  assert saved['scoring']['protocol'] == 'lavt' and saved['scoring']['image_size'] == 64
  assert saved['splits']['val']['lavt_test']['seg_total'] == results['val']['samples']
  with pytest.raises(ValueError, match='--released'):
    evaluate.run(config, str(tmp_path / 'run'), splits=['val'], released=True, checkpoint='2')
  eavl_config = tiny_config.get_config()
  eavl_config.data.data_dir = synthetic_records
  with pytest.raises(ValueError, match="model.name='lavt'"):
    evaluate.run(eavl_config, str(tmp_path / 'eavl'), splits=['val'], released=True)
