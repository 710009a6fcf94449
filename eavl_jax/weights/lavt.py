"""A released LAVT checkpoint (the .pth LAVT-RIS's train.py writes) -> the JAX LAVT's variables.

The file holds {'model': the LAVT model's state dict, 'bert_model': its BERT's, 'optimizer', ...}
(LAVT's --model lavt), or BERT inside 'model' under 'text_encoder.' (--model lavt_one). Names map
by rule (i: stage, 0..3):

  backbone.patch_embed, .layers.i.blocks, .layers.i.downsample   vision_encoder (weights/swin.py,
                                                                  the official layout)
  backbone.layers.i.fusion.vis_project.0                          pwam_i/vis_project
  backbone.layers.i.fusion.image_lang_att.f_query.0, f_key.0,     pwam_i/query, key, value, out
    f_value.0, W.0
  backbone.layers.i.fusion.project_mm.0                           pwam_i/project_mm
  backbone.layers.i.res_gate.0, res_gate.2                        gate_i/dense_0, dense_1
  backbone.norm{i}                                                output_norm_i
  classifier.conv{j}_{k}, classifier.bn{j}_{k}                    decoder/conv{j}_{k}, bn{j}_{k}
    (BatchNorm running_mean, running_var                          batch_stats: decoder/bn{j}_{k}/
                                                                  mean, var)
  classifier.conv1_1                                              classifier (head 'fixed')
  bert_model.* or model.text_encoder.*                            text_encoder (weights/bert.py)

Conv1d (O, I, 1) and Linear (O, I) weights become Dense kernels (I, O), Conv2d (O, I, kh, kw)
weights conv kernels (kh, kw, I, O). Dropped, and logged with the reason: buffers
(relative_position_index, num_batches_tracked, position_ids), BERT's pooler, stage 4's gate (its
gated map feeds no stage: LAVT computes it and throws it away) and, with model.lavt.head='aligner',
the classifier (that head replaces it; its own parameters keep their initial values).
The key report is the encoders' (weights/report.py): model.allow_missing_keys /
allow_unexpected_keys; a shape mismatch always fails.
"""
import argparse
import re
from typing import Dict, Tuple

from absl import logging
import numpy as np

from eavl_jax.weights import bert as bert_weights
from eavl_jax.weights import report
from eavl_jax.weights import swin as swin_weights

PARAMS, BATCH_STATS = 'params', 'batch_stats'   # first part of each converted name
HEAD_SUBTREES = {'fixed': 'classifier', 'aligner': 'aligner_head'}
LAST_STAGE = 3
_PWAM_PARTS = {'fusion.vis_project.0': 'vis_project', 'fusion.image_lang_att.f_query.0': 'query',
               'fusion.image_lang_att.f_key.0': 'key', 'fusion.image_lang_att.f_value.0': 'value',
               'fusion.image_lang_att.W.0': 'out', 'fusion.project_mm.0': 'project_mm'}
_FUSION = re.compile(r'^backbone\.layers\.(\d+)\.(fusion\..+|res_gate\.\d+)\.(weight|bias)$')
_OUTPUT_NORM = re.compile(r'^backbone\.norm(\d+)\.(weight|bias)$')
_DECODER = re.compile(r'^classifier\.(conv\d+_\d+|bn\d+_\d+)\.(\w+)$')
_BATCH_NORM_LEAVES = {'weight': (PARAMS, 'scale'), 'bias': (PARAMS, 'bias'),
                      'running_mean': (BATCH_STATS, 'mean'), 'running_var': (BATCH_STATS, 'var')}


def read_checkpoint(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
  """-> (the LAVT model's state dict, its BERT's: from 'bert_model' or model's 'text_encoder.'),
  as float32 / integer numpy arrays."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional: only to read LAVT's .pth)
  except ImportError as e:
    raise ValueError(f'{path} is a PyTorch file and torch is not installed') from e
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):   # LAVT saves its 'args'
      state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: torch.load failed ({type(e).__name__}: {e})') from e
  if not isinstance(state, dict) or not isinstance(state.get('model'), dict):
    found = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"{path} is not a LAVT checkpoint: no 'model' state dict (found {found})")
  numpy = lambda sd: {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
                      for k, v in _without_module_prefix(sd).items() if isinstance(v, torch.Tensor)}
  model = numpy(state['model'])
  bert = numpy(state.get('bert_model') or {})
  bert.update({k[len('text_encoder.'):]: v for k, v in model.items()
               if k.startswith('text_encoder.')})
  return {k: v for k, v in model.items() if not k.startswith('text_encoder.')}, bert


def _without_module_prefix(state):
  """'module.x' -> 'x' when every key has the prefix (a state dict saved from a DDP wrapper)."""
  if state and all(k.startswith('module.') for k in state):
    return {k[len('module.'):]: v for k, v in state.items()}
  return state


def _dense_kernel(value):
  """Conv1d (O, I, 1) or Linear (O, I) weight -> Dense kernel (I, O)."""
  return value.reshape(value.shape[0], -1).T


def lavt_part_name(name, value):
  """A LAVT-only key -> (converted name, array), or (None, reason) for a dropped key, or
  (None, None) for a key of the Swin itself (converted by weights/swin.py)."""
  match = _FUSION.match(name)
  if match:
    stage, part, leaf = int(match.group(1)), match.group(2), match.group(3)
    if part.startswith('res_gate.'):
      if stage == LAST_STAGE:
        return None, "stage 4's gate (its gated map feeds no stage)"
      module = f'gate_{stage}/dense_{int(part.split(".")[1]) // 2}'
    elif part in _PWAM_PARTS:
      module = f'pwam_{stage}/{_PWAM_PARTS[part]}'
    else:
      return f'{PARAMS}/{name}', value      # unknown: reported as unexpected under its own name
    return (f'{PARAMS}/{module}/kernel', _dense_kernel(value)) if leaf == 'weight' else (
        f'{PARAMS}/{module}/bias', value)
  match = _OUTPUT_NORM.match(name)
  if match:
    leaf = 'scale' if match.group(2) == 'weight' else 'bias'
    return f'{PARAMS}/output_norm_{match.group(1)}/{leaf}', value
  match = _DECODER.match(name)
  if match:
    module, leaf = match.groups()
    if leaf == 'num_batches_tracked':
      return None, 'a buffer'
    if module.startswith('bn'):
      if leaf not in _BATCH_NORM_LEAVES:
        return f'{PARAMS}/{name}', value
      collection, leaf = _BATCH_NORM_LEAVES[leaf]
      return f'{collection}/decoder/{module}/{leaf}', value
    where = 'classifier' if module == 'conv1_1' else f'decoder/{module}'
    if leaf == 'weight':
      return f'{PARAMS}/{where}/kernel', np.transpose(value, (2, 3, 1, 0))
    return f'{PARAMS}/{where}/{leaf}', value
  if name.startswith('backbone.') and not name.startswith('backbone.norm.'):
    return None, None
  return f'{PARAMS}/{name}', value          # reported as unexpected under its own name


def convert_state_dicts(model_state, bert_state):
  """LAVT's two state dicts -> (flat {'params/...' | 'batch_stats/...': array},
  {converted name: the checkpoint's name}, {dropped checkpoint name: reason})."""
  flat, sources, dropped, swin_state = {}, {}, {}, {}
  for name, value in model_state.items():
    target, converted = lavt_part_name(name, value)
    if target is not None:
      flat[target], sources[target] = np.asarray(converted), name
    elif converted is not None:
      dropped[name] = converted
    else:
      swin_state[name[len('backbone.'):]] = value
  swin_flat, _, swin_sources, layout = swin_weights.convert_state_dict(swin_state)
  for k, v in swin_flat.items():
    source = swin_sources.get(k, k)
    if layout == 'official':   # the file's own name: merging at the end of the previous stage
      source = re.sub(r'^layers\.(\d+)\.downsample\.',
                      lambda m: f'layers.{int(m.group(1)) - 1}.downsample.', source)
    flat[f'{PARAMS}/vision_encoder/{k}'] = v
    sources[f'{PARAMS}/vision_encoder/{k}'] = 'backbone.' + source
  for name, value in bert_state.items():
    target, transpose = bert_weights.torch_to_flax_name(name, np.ndim(value))
    if target is None or target.startswith('pooler/'):
      dropped['bert_model.' + name] = 'a buffer' if target is None else "BERT's pooler"
      continue
    flat[f'{PARAMS}/text_encoder/{target}'] = value.T if transpose else value
    sources[f'{PARAMS}/text_encoder/{target}'] = 'bert_model.' + name
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}, sources, dropped


def expected_keys(variables, head):
  """Flat {'params/...' | 'batch_stats/...': leaf} the checkpoint must fill: everything but the
  aligner head (head='aligner'), which LAVT's file cannot hold."""
  skip = HEAD_SUBTREES['aligner'] + '/'
  flat = {f'{PARAMS}/{k}': v for k, v in report.flatten(variables[PARAMS]).items()
          if head != 'aligner' or not k.startswith(skip)}
  flat.update({f'{BATCH_STATS}/{k}': v
               for k, v in report.flatten(variables.get(BATCH_STATS) or {}).items()})
  return flat


def load_lavt(path, variables, model_config):
  """{'params', 'batch_stats'} of the JAX LAVT (host arrays) -> the same trees with the weights of
  the LAVT checkpoint at `path` in them (names, shapes and dtypes kept). Raises ValueError naming
  every missing, unexpected or mis-shaped key (model.allow_missing_keys / allow_unexpected_keys)."""
  head = model_config.lavt.head
  flat, sources, dropped = convert_state_dicts(*read_checkpoint(path))
  if head == 'aligner':
    for k in [k for k in flat if k.startswith(f'{PARAMS}/{HEAD_SUBTREES["fixed"]}/')]:
      dropped[sources.pop(k)] = "LAVT's classifier (model.lavt.head='aligner' replaces it)"
      del flat[k]
  loaded = report.check_keys(flat, expected_keys(variables, head), f'LAVT checkpoint {path}',
                             allow_missing=model_config.allow_missing_keys,
                             allow_unexpected=model_config.allow_unexpected_keys, sources=sources)
  for name, reason in sorted(dropped.items()):
    logging.info('LAVT checkpoint %s: dropped %s (%s)', path, name, reason)
  out = dict(variables)
  for collection in (PARAMS, BATCH_STATS):
    prefix = collection + '/'
    part = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
    if variables.get(collection):
      out[collection] = report.merge(variables[collection], part)
  return out
