"""BERT checkpoints (HF Flax msgpack, safetensors, pytorch_model.bin) -> the Flax BertModel tree.

Torch names map to the Flax (HF FlaxBertModel) names by rule: a 'bert.' prefix is stripped,
LayerNorm weight/gamma -> scale and bias/beta -> bias, an Embedding's weight -> embedding,
a Linear's weight (out, in) -> kernel (in, out). The MLM / NSP heads ('cls/...') and the pooler
(EAVL uses the [CLS] hidden state itself) are dropped; buffers (position_ids) are ignored.
"""
import json
import os
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
from absl import logging
import ml_collections
import numpy as np

from eavl_jax import hub
from eavl_jax.models import bert as bert_model
from eavl_jax.weights import files
from eavl_jax.weights import report

# Looked for in this order in the checkpoint folder.
WEIGHT_FILES = ('flax_model.msgpack', 'model.safetensors', 'pytorch_model.bin')
DROPPED_PREFIXES = ('cls/', 'pooler/')  # heads EAVL does not use
# The architecture read from config.json; the dropout rates stay the experiment's choice.
ARCHITECTURE_FIELDS = tuple(f for f in bert_model.SIZE_FIELDS if not f.endswith('dropout_prob'))


def torch_to_flax_name(name: str, ndim: int):
  """'bert.encoder.layer.0.attention.self.query.weight' -> ('encoder/layer/0/.../kernel',
  whether to transpose); (None, False) for buffers."""
  if name.startswith('bert.'):
    name = name[len('bert.'):]
  *module, leaf = name.split('.')
  if leaf == 'position_ids':
    return None, False
  if leaf in ('bias', 'beta'):
    leaf = 'bias'
  elif leaf in ('weight', 'gamma'):
    if module and module[-1] == 'LayerNorm' or leaf == 'gamma':
      leaf = 'scale'
    elif module and module[-1].endswith('_embeddings'):
      leaf = 'embedding'
    elif ndim == 2:
      return '/'.join(module + ['kernel']), True
  return '/'.join(module + [leaf]), False


def read_folder(folder: str) -> Tuple[Dict[str, np.ndarray], str]:
  """-> (flat {flax name: array} including the dropped heads, the file read)."""
  for name in WEIGHT_FILES:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      break
  else:
    raise ValueError(f'BERT folder {folder} holds none of {WEIGHT_FILES} '
                     f'(it has: {sorted(os.listdir(folder))})')
  raw = files.read_any(path)
  if name.endswith('.msgpack'):  # already Flax names, maybe under 'bert/'
    flat = {k[len('bert/'):] if k.startswith('bert/') else k: v for k, v in raw.items()}
  else:
    flat = {}
    for key, value in raw.items():
      flax_name, transpose = torch_to_flax_name(key, np.ndim(value))
      if flax_name is not None:
        flat[flax_name] = value.T if transpose else value
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}, path


def read_config(folder: str) -> dict:
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'BERT folder {folder} has no config.json (the model sizes are read from it)')
  with open(path) as f:
    hf_config = json.load(f)
  missing = [f for f in ARCHITECTURE_FIELDS if f not in hf_config]
  if missing:
    raise ValueError(f'{path} lacks {missing}')
  if hf_config.get('hidden_act', 'gelu') != 'gelu':
    raise ValueError(f"{path}: hidden_act={hf_config['hidden_act']!r}; the Flax BERT implements "
                     "'gelu' (erf) only")
  if hf_config.get('position_embedding_type', 'absolute') != 'absolute':
    raise ValueError(f"{path}: position_embedding_type={hf_config['position_embedding_type']!r}; "
                     "the Flax BERT implements 'absolute' only")
  return hf_config


def bert_config_from_checkpoint(spec: str) -> dict:
  """The architecture fields of model.text_encoder ({field: value}) from spec's config.json."""
  hf_config = read_config(hub.resolve_folder(spec))
  return {f: hf_config[f] for f in ARCHITECTURE_FIELDS}


def with_checkpoint_text_sizes(model_config):
  """`model_config` (unchanged) or, when text_encoder.pretrained names a checkpoint, a copy whose
  text_encoder architecture fields are those of the checkpoint's config.json."""
  spec = model_config.text_encoder.pretrained
  if not hub.names_checkpoint(spec):   # '' or 'scratch': the declared sizes
    return model_config
  try:
    sizes = read_config(hub.resolve_folder(spec, download=False))
  except hub.NotCachedError:
    # Not on this machine yet: the declared sizes stand (they are bert-base's in configs/base.py);
    # loading the weights later downloads the files or fails with the reason.
    logging.warning('%s is not cached here: model.text_encoder sizes are taken from the config',
                    spec)
    return model_config
  sizes = {f: sizes[f] for f in ARCHITECTURE_FIELDS}
  if all(model_config.text_encoder[f] == v for f, v in sizes.items()):
    return model_config
  out = ml_collections.ConfigDict(model_config.to_dict())
  with out.text_encoder.unlocked():
    out.text_encoder.update(sizes)
  return out


def abstract_params(sizes: dict):
  """ShapeDtypeStructs of BertModel(**sizes) (dropout rates filled in: they hold no weights)."""
  model = bert_model.BertModel(**{'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
                                  **{f: sizes[f] for f in ARCHITECTURE_FIELDS}}, remat=False)
  ids = jnp.zeros((1, 2), jnp.int32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, ids)['params']


def load_bert(spec: str, expected=None, *, allow_missing: bool = False,
              allow_unexpected: bool = False):
  """-> (params tree, hf_config dict) of the BERT at `spec` (folder, 'package:<module>', hub id).

  expected: the tree to match (arrays or ShapeDtypeStructs); default: BertModel built with the
  checkpoint's config.json. Missing keys keep expected's values (when allowed and concrete).
  """
  folder = hub.resolve_folder(spec)
  hf_config = read_config(folder)
  flat, path = read_folder(folder)
  flat = {k: v for k, v in flat.items() if not k.startswith(DROPPED_PREFIXES)}
  if expected is None:
    expected = abstract_params(hf_config)
  loaded = report.check_keys(flat, report.flatten(expected), f'BERT checkpoint {path}',
                             allow_missing=allow_missing, allow_unexpected=allow_unexpected)
  return report.merge(expected, loaded), hf_config
