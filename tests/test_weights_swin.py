"""Pretrained Swin into the Flax SwinTransformer: official / timm / Hugging Face layouts give the
stage maps of timm's and transformers' PyTorch models; the key report.

The numeric 384² / 480² comparison uses timm's SwinTransformer class with window 12 (Swin-B's, so
the same clamping and padding at every stage) but narrow and shallow stages: Swin-B itself takes
over a minute per size on 2 CPU cores. Swin-B's layout is checked name by name and shape by shape.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import transformers
from safetensors import numpy as safetensors_numpy
from timm.models import swin_transformer as timm_swin

from configs import base
from eavl_jax import weights
from eavl_jax.models import swin
from eavl_jax.weights import report
from eavl_jax.weights import swin as swin_weights

REDUCED = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=12)
FLAX_ONLY = dict(patch_size=4, mlp_ratio=4.0, drop_path_rate=0.0, remat=False)  # timm's defaults


def _randomise(module, seed):
  """Every parameter random: timm and HF start norms at 1/0 and HF bias tables at 0."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith('relative_position_bias_table'):
        p.copy_(0.5 * noise)
      elif p.ndim == 1:
        p.copy_((1.0 if 'norm' in name and name.endswith('weight') else 0.0) + 0.1 * noise)
      else:
        p.copy_(noise / np.sqrt(p.shape[1] * (p[0, 0].numel() if p.ndim == 4 else 1)))
  return module.eval()


def _timm_model(img_size):
  return timm_swin.SwinTransformer(img_size=img_size, num_classes=5, **REDUCED).eval()


@functools.lru_cache()
def _timm_state():
  return {k: v.clone() for k, v in _randomise(_timm_model(384), 0).state_dict().items()}


def official_layout(timm_state):
  """timm >= 0.9 names -> the official release's: merging at the end of the previous stage,
  'head', and the buffers the release stores (relative_position_index, attn_mask)."""
  out = {}
  for k, v in timm_state.items():
    parts = k.split('.')
    if parts[0] == 'layers' and parts[2] == 'downsample':
      k = '.'.join(['layers', str(int(parts[1]) - 1)] + parts[2:])
    out[k.replace('head.fc.', 'head.')] = v
    if k.endswith('attn.qkv.weight'):
      out[k.replace('qkv.weight', 'relative_position_index')] = torch.zeros(144, 144).long()
      out[k.replace('attn.qkv.weight', 'attn_mask')] = torch.zeros(4, 144, 144)
  return out


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  folder = tmp_path_factory.mktemp('swin')
  state = _timm_state()
  paths = {'official': str(folder / 'swin_official.pth'), 'timm': str(folder / 'swin_timm.pth'),
           'timm_safetensors': str(folder / 'swin_timm.safetensors')}
  torch.save({'model': official_layout(state)}, paths['official'])
  torch.save(state, paths['timm'])
  safetensors_numpy.save_file({k: v.numpy() for k, v in state.items()}, paths['timm_safetensors'])
  return paths


def _expected(**kw):
  model = swin.SwinTransformer(**kw, **FLAX_ONLY)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']


def _layer_norm(x, scale, bias, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_official_and_timm_layouts_give_the_same_params(checkpoints):
  loaded = {name: weights.load_swin(path, _expected(**REDUCED), with_final_norm=True)
            for name, path in checkpoints.items()}
  ref = report.flatten(loaded['timm'][0])
  # patch merging sits at the start of stages 1..3, as in timm >= 0.9
  assert 'layers_1/downsample/reduction/kernel' in ref and not any('layers_0/down' in k for k in ref)
  for name, (params, final_norm) in loaded.items():
    flat = report.flatten(params)
    assert sorted(flat) == sorted(ref), name
    for k in ref:
      np.testing.assert_array_equal(flat[k], ref[k], err_msg=f'{name}: {k}')
    np.testing.assert_array_equal(final_norm['scale'], _timm_state()['norm.weight'].numpy())


@pytest.mark.parametrize('size', [384, 480])
def test_stage_maps_equal_timm(checkpoints, size):
  params, final_norm = weights.load_swin(checkpoints['official'], _expected(**REDUCED),
                                         with_final_norm=True)
  reference = _timm_model(size)
  reference.load_state_dict(_timm_state())
  image = np.random.RandomState(size).randn(1, size, size, 3).astype(np.float32)
  with torch.no_grad():
    x = reference.patch_embed(torch.from_numpy(image).permute(0, 3, 1, 2))  # NHWC out
    want = []
    for stage in reference.layers:  # raw stage maps, as the Flax model returns them
      x = stage(x)
      want.append(x.numpy())
    features = reference.norm(x).numpy()  # forward_features: the final norm after the stages
  got = jax.jit(swin.SwinTransformer(**REDUCED, **FLAX_ONLY).apply)({'params': params}, image)
  s = size // 4
  assert [g.shape for g in got] == [(1, s >> i, s >> i, 16 << i) for i in range(4)]
  for i, (g, w) in enumerate(zip(got, want)):
    assert np.abs(w).max() > 0.5, i  # not a trivial map
    np.testing.assert_allclose(np.asarray(g), w, atol=1e-4, err_msg=f'stage {i}')
  # the final norm (-> vision_norm_4) over stage 4 is timm's forward_features
  np.testing.assert_allclose(_layer_norm(np.asarray(got[3]), final_norm['scale'], final_norm['bias']),
                             features, atol=1e-4)


def test_swin_b_official_and_timm_layouts_match_the_configured_model():
  with torch.device('meta'):  # names and shapes only, nothing allocated
    state = timm.create_model('swin_base_patch4_window12_384', pretrained=False).state_dict()
  zeros = lambda v: np.broadcast_to(np.float32(0), tuple(v.shape))  # no memory either
  expected = report.flatten(swin_weights.abstract_params(base.get_config().model.vision_encoder))
  for layout, named in (('timm', state), ('official', official_layout(state))):
    flat, final_norm, _, found = swin_weights.convert_state_dict(
        {k: zeros(v) for k, v in named.items()})
    assert found == layout
    report.check_keys(flat, expected, layout)  # raises on any missing / unexpected / shape
    assert final_norm['scale'].shape == (1024,)
  assert len(expected) == 329 - 2 - 2  # timm's keys less the final norm and the classifier


def _hf_models(tmp_path):
  config = transformers.SwinConfig(image_size=128, patch_size=4, embed_dim=16, depths=[2, 2, 2, 2],
                                   num_heads=[1, 2, 2, 4], window_size=4)
  model = _randomise(transformers.SwinModel(config), 1)
  model.save_pretrained(str(tmp_path / 'swin_model'))
  classifier = transformers.SwinForImageClassification(config)
  classifier.swin.load_state_dict(model.state_dict())
  classifier.save_pretrained(str(tmp_path / 'swin_classifier'))  # 'swin.' prefix + 'classifier'
  return model


def test_hugging_face_swin_stage_maps(tmp_path):
  """128²: stage maps 32, 16, 8, 4 with window 4, none padded (HF pads, then rolls; timm rolls,
  then pads) and none clamped (transformers 5.24's SwinModel fails on a map smaller than the
  window: its bias is built for the configured window)."""
  reference = _hf_models(tmp_path)
  tiny = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)
  params, final_norm = weights.load_swin(str(tmp_path / 'swin_model'), _expected(**tiny),
                                         with_final_norm=True)
  from_classifier = weights.load_swin(
      str(tmp_path / 'swin_classifier' / 'model.safetensors'), _expected(**tiny))
  for k, v in report.flatten(params).items():
    np.testing.assert_array_equal(report.flatten(from_classifier)[k], v, err_msg=k)
  image = np.random.RandomState(0).randn(1, 128, 128, 3).astype(np.float32)
  with torch.no_grad():
    out = reference(torch.from_numpy(image).permute(0, 3, 1, 2), output_hidden_states=True,
                    output_hidden_states_before_downsampling=True)
  got = jax.jit(swin.SwinTransformer(**tiny, **FLAX_ONLY).apply)({'params': params}, image)
  for i, g in enumerate(got):
    want = out.reshaped_hidden_states[i + 1].permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    assert np.abs(want).max() > 0.5, i
    np.testing.assert_allclose(np.asarray(g), want, atol=1e-4, err_msg=f'stage {i}')
  last = _layer_norm(np.asarray(got[3]), final_norm['scale'], final_norm['bias']).reshape(1, 16, 128)
  np.testing.assert_allclose(last, out.last_hidden_state.numpy(), atol=1e-4)


@pytest.mark.parametrize('edit, kind, name', [
    (lambda s: s.pop('layers.1.blocks.0.attn.qkv.bias'), 'missing', 'layers_1/blocks_0/attn/qkv/bias'),
    (lambda s: s.update({'layers.1.blocks.0.attn.extra.weight': torch.zeros(4, 4)}), 'unexpected',
     'layers.1.blocks.0.attn.extra.weight'),
    (lambda s: s.update({'layers.2.blocks.1.mlp.fc1.weight': torch.zeros(10, 64)}),
     'shape mismatch', 'layers_2/blocks_1/mlp/fc1/kernel'),
])
def test_key_report_names_the_key(tmp_path, edit, kind, name):
  state = dict(_timm_state())
  edit(state)
  path = str(tmp_path / 'bad.pth')
  torch.save(state, path)
  with pytest.raises(ValueError, match=kind) as error:
    weights.load_swin(path, _expected(**REDUCED))
  assert name in str(error.value)
  if kind != 'shape mismatch':  # allowed on request; a shape mismatch never is
    weights.load_swin(path, _expected(**REDUCED), allow_missing=True, allow_unexpected=True)


def test_a_path_that_does_not_exist_is_a_clear_error():
  with pytest.raises(ValueError, match='does not exist'):
    weights.load_swin('/no/such/folder/swin_base_patch4_window12_384_22k.pth')
