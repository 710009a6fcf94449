"""Reading checkpoint files into flat {name: float32 numpy array} dicts (torch only when needed)."""
import os
from typing import Dict

import numpy as np
from flax import serialization
from flax import traverse_util


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top  (.safetensors files only)
  try:
    return dict(safetensors_numpy.load_file(path))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: not a readable safetensors file ({type(e).__name__}: {e})') from e


def read_torch(path: str) -> Dict[str, np.ndarray]:
  """A torch pickle (.pth / .bin / .pt) -> numpy; {'model' | 'state_dict': sd} is unwrapped."""
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional: only to read torch pickles)
  except ImportError as e:
    raise ValueError(f'{path} is a PyTorch file and torch is not installed: install torch, or '
                     'convert the weights once where it is (python -m eavl_jax.convert) and point '
                     'the config at the converted folder') from e
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: torch.load failed ({type(e).__name__}: {e})') from e
  for key in ('model', 'state_dict'):
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
  if not isinstance(state, dict):
    raise ValueError(f'{path}: expected a state dict, got {type(state).__name__}')
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_msgpack(path: str) -> Dict[str, np.ndarray]:
  """A flax msgpack tree -> flat {'a/b/kernel': array}."""
  with open(path, 'rb') as f:
    try:
      tree = serialization.msgpack_restore(f.read())
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{path}: not a flax msgpack file ({type(e).__name__}: {e})') from e
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


def write_msgpack(path: str, flat: Dict[str, np.ndarray]):
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tree = traverse_util.unflatten_dict({k: np.asarray(v) for k, v in flat.items()}, sep='/')
  with open(path, 'wb') as f:
    f.write(serialization.msgpack_serialize(tree))


def check_header(path: str, key: str):
  """ValueError naming `key` unless `path` is a file whose first bytes are those of the format its
  name says (.safetensors: a JSON header; .msgpack: a map; else a torch zip archive or pickle).
  Reads a few bytes, not the file: for the checks before any slow work."""
  if not os.path.isfile(path):
    raise ValueError(f'{key}={path!r}: no such file')
  with open(path, 'rb') as f:
    head = f.read(9)
  size = os.path.getsize(path)
  if path.endswith('.safetensors'):
    header = int.from_bytes(head[:8], 'little') if len(head) >= 8 else 0
    ok = 0 < header < size and head[8:9] == b'{'
    kind = 'a safetensors file (an 8-byte length, then a JSON header)'
  elif path.endswith('.msgpack'):
    ok = head[:1] in (b'\xde', b'\xdf') or b'\x80' <= head[:1] <= b'\x8f'
    kind = 'a flax msgpack file (a map)'
  else:
    ok = head[:4] == b'PK\x03\x04' or head[:1] == b'\x80'
    kind = "a PyTorch checkpoint (torch.save's zip archive or a pickle)"
  if not ok:
    raise ValueError(f'{key}={path!r}: not {kind}; its first bytes are {head[:8]!r}')


def read_any(path: str) -> Dict[str, np.ndarray]:
  """By extension: .safetensors, .msgpack, else a torch pickle."""
  if not os.path.isfile(path):
    raise ValueError(f'checkpoint file {path!r} does not exist')
  if path.endswith('.safetensors'):
    return read_safetensors(path)
  if path.endswith('.msgpack'):
    return read_msgpack(path)
  return read_torch(path)
