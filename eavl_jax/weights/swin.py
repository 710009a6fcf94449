"""Swin checkpoints -> the Flax SwinTransformer tree (eavl_jax/models/swin.py, timm's names).

Accepted layouts (told apart by their names):
- official Microsoft release (.pth, {'model': state_dict}): patch merging at the END of stage i
  ('layers.i.downsample', i = 0..2), classifier 'head';
- timm >= 0.9 (.pth / .safetensors): patch merging at the START of stage i ('layers.i.downsample',
  i = 1..3), classifier 'head.fc';
- Hugging Face SwinModel / SwinForImageClassification (.safetensors / .bin, optional 'swin.'
  prefix): 'embeddings.patch_embeddings.projection', 'encoder.layers.i.blocks.j.attention.self.
  {query,key,value}' (fused here into qkv), 'layernorm_before/after', 'encoder.layers.i.downsample'
  at the end of stage i, final 'layernorm', classifier 'classifier';
- a converted file (swin.msgpack, written by eavl_jax.convert): the Flax tree itself.
All three concatenate the 2x2 neighbours of patch merging in the same order, (0,0), (1,0), (0,1),
(1,1) as (row, col) (read from their sources; tests/test_weights_swin.py checks it numerically).
Buffers (relative_position_index, attn_mask, relative_coords_table) are dropped: the model computes
them. The classifier is dropped. The final norm ('norm' / 'layernorm', over the last stage) is no
part of the backbone: it is returned apart, and load_pretrained_encoders puts it in vision_norm_4.
"""
import os
import re
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from eavl_jax import hub
from eavl_jax.models import swin as swin_model
from eavl_jax.weights import files
from eavl_jax.weights import report

CONVERTED_FILE = 'swin.msgpack'
FINAL_NORM = 'final_norm'  # its subtree in a converted file: {'scale', 'bias'}
_BUFFERS = ('relative_position_index', 'attn_mask', 'relative_coords_table')
_CLASSIFIER = re.compile(r'^(head|classifier)\.')
# Hugging Face module names -> timm's (inside encoder.layers.i.blocks.j / embeddings).
_HF_RENAMES = (
    (r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
    (r'^embeddings\.norm\.', 'patch_embed.norm.'),
    (r'^encoder\.layers\.', 'layers.'),
    (r'\.layernorm_before\.', '.norm1.'),
    (r'\.layernorm_after\.', '.norm2.'),
    (r'\.attention\.self\.relative_position_bias_table$', '.attn.relative_position_bias_table'),
    (r'\.attention\.relative_position_bias\.relative_position_bias_table$',
     '.attn.relative_position_bias_table'),
    (r'\.attention\.output\.dense\.', '.attn.proj.'),
    (r'\.intermediate\.dense\.', '.mlp.fc1.'),
    (r'\.output\.dense\.', '.mlp.fc2.'),
    (r'^layernorm\.', 'norm.'),
)
_HF_QKV = re.compile(r'^(.*)\.attention\.self\.(query|key|value)\.(weight|bias)$')


def _shift_downsample(name):
  """'layers.i.downsample' (end of stage i) -> 'layers.(i+1).downsample' (start of stage i+1)."""
  return re.sub(r'^layers\.(\d+)\.downsample\.',
                lambda m: f'layers.{int(m.group(1)) + 1}.downsample.', name)


def _from_hf(state):
  out, qkv = {}, {}
  for name, value in state.items():
    if name.startswith('swin.'):
      name = name[len('swin.'):]
    match = _HF_QKV.match(name)
    if match:
      prefix, part, leaf = match.groups()
      qkv.setdefault((prefix, leaf), {})[part] = (name, value)
      continue
    for pattern, repl in _HF_RENAMES:
      name = re.sub(pattern, repl, name)
    out[_shift_downsample(name)] = value
  for (prefix, leaf), parts in qkv.items():
    name = _shift_downsample(re.sub(r'^encoder\.layers\.', 'layers.', prefix)) + f'.attn.qkv.{leaf}'
    if set(parts) != {'query', 'key', 'value'}:
      for part, (source, value) in parts.items():
        out[source] = value  # incomplete: reported under its own name
      continue
    out[name] = np.concatenate([parts[p][1] for p in ('query', 'key', 'value')], axis=0)
  return out


def to_timm_names(state: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], str]:
  """Any accepted torch layout -> (timm >= 0.9 names, the layout's name)."""
  if any('patch_embeddings.projection' in k or k.startswith(('encoder.layers.', 'swin.encoder.'))
         for k in state):
    return _from_hf(state), 'huggingface'
  if any(k.startswith('layers.0.downsample.') for k in state):
    return {_shift_downsample(k): v for k, v in state.items()}, 'official'
  return dict(state), 'timm'


def timm_to_flax_name(name: str, ndim: int):
  """timm name -> (flax name, how to convert the array): 'conv', 'linear' or None."""
  name = re.sub(r'^layers\.(\d+)\.', r'layers_\1.', name)
  name = re.sub(r'\.blocks\.(\d+)\.', r'/blocks_\1.', name)
  *module, leaf = name.split('.')
  path = '/'.join(module)
  if leaf == 'weight':
    if ndim == 4:
      return f'{path}/kernel', 'conv'
    if ndim == 2:
      return f'{path}/kernel', 'linear'
    return f'{path}/scale', None  # LayerNorm
  return f'{path}/{leaf}', None


def convert_state_dict(state: Dict[str, np.ndarray]
                       ) -> Tuple[Dict[str, np.ndarray], Optional[dict], Dict[str, str], str]:
  """A torch-named state dict (numpy) -> (flat {flax name: array}, final norm or None,
  {flax name: checkpoint name}, layout name)."""
  timm_state, layout = to_timm_names(state)
  flat, sources, final_norm = {}, {}, {}
  for name, value in timm_state.items():
    if name.split('.')[-1] in _BUFFERS or _CLASSIFIER.match(name):
      continue
    if name.startswith('norm.'):
      final_norm['scale' if name.endswith('weight') else 'bias'] = np.asarray(value, np.float32)
      continue
    flax_name, kind = timm_to_flax_name(name, np.ndim(value))
    if kind == 'conv':
      value = np.transpose(value, (2, 3, 1, 0))  # (O, I, kh, kw) -> (kh, kw, I, O)
    elif kind == 'linear':
      value = value.T  # (out, in) -> (in, out)
    flat[flax_name] = np.asarray(value, np.float32)
    sources[flax_name] = name
  return flat, final_norm or None, sources, layout


def checkpoint_file(path: str) -> str:
  """The file a Swin `path` stands for: itself, or in a folder its swin.msgpack, model.safetensors
  or first .pth / .pt / .bin."""
  if not os.path.isdir(path):
    return path
  candidates = [os.path.join(path, n) for n in (CONVERTED_FILE, 'model.safetensors')]
  candidates += sorted(os.path.join(path, n) for n in os.listdir(path)
                       if n.endswith(('.pth', '.pt', '.bin')))
  found = [c for c in candidates if os.path.isfile(c)]
  if not found:
    raise ValueError(f'Swin folder {path} holds no {CONVERTED_FILE}, model.safetensors or .pth')
  return found[0]


def read_swin(path: str):
  """-> (flat {flax name: array}, final norm {'scale','bias'} or None, {flax name: source name},
  description). `path`: a file; a folder holding swin.msgpack, model.safetensors or a .pth; or a
  hub id resolved by eavl_jax.hub.resolve_folder."""
  if not os.path.exists(path):
    path = hub.resolve_folder(path)  # a hub id ('microsoft/swin-...') in the local HF cache
  path = checkpoint_file(path)
  raw = files.read_any(path)
  if path.endswith('.msgpack'):
    final_norm = {k.split('/', 1)[1]: v for k, v in raw.items() if k.startswith(FINAL_NORM + '/')}
    flat = {k: v for k, v in raw.items() if not k.startswith(FINAL_NORM + '/')}
    return flat, final_norm or None, {}, f'Swin checkpoint {path} (converted)'
  flat, final_norm, sources, layout = convert_state_dict(raw)
  return flat, final_norm, sources, f'Swin checkpoint {path} ({layout} layout)'


def abstract_params(vision_config):
  """ShapeDtypeStructs of the SwinTransformer that `model.vision_encoder` describes."""
  v = vision_config
  model = swin_model.SwinTransformer(**swin_model.config_sizes(v), remat=False)
  size = v.patch_size * 8  # smallest input with four stages; the weights do not depend on it
  images = jnp.zeros((1, size, size, 3))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)['params']


def load_swin(path: str, expected=None, *, allow_missing: bool = False,
              allow_unexpected: bool = False, with_final_norm: bool = False):
  """The Flax SwinTransformer params from `path` (official .pth, timm, HF safetensors, converted).

  expected: the tree to match (arrays or ShapeDtypeStructs, e.g. abstract_params(config)); None:
  only the checkpoint's own names are converted (no key report). with_final_norm: return
  (params, final_norm or None).
  """
  flat, final_norm, sources, what = read_swin(path)
  if expected is None:
    params = report.unflatten(flat)
  else:
    loaded = report.check_keys(flat, report.flatten(expected), what, allow_missing=allow_missing,
                               allow_unexpected=allow_unexpected, sources=sources)
    params = report.merge(expected, loaded)
  return (params, final_norm) if with_final_norm else params
