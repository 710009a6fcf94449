"""Key report: a converted checkpoint against the parameter tree the model expects.

Trees are compared as flat dicts {'a/b/kernel': array}. Missing and unexpected keys are errors
unless `model.allow_missing_keys` / `model.allow_unexpected_keys` allow them; a shape mismatch
is always an error.
"""
from typing import Dict, Mapping, Optional

from absl import logging
import numpy as np
from flax import traverse_util


def flatten(tree) -> Dict[str, object]:
  return traverse_util.flatten_dict(tree, sep='/')


def unflatten(flat: Mapping[str, object]):
  return traverse_util.unflatten_dict(dict(flat), sep='/')


def _names(keys, sources):
  return ', '.join(f'{k} (from {sources[k]!r})' if sources and sources.get(k, k) != k else k
                   for k in keys)


def check_keys(loaded: Mapping[str, np.ndarray], expected: Mapping[str, object], what: str, *,
               allow_missing: bool = False, allow_unexpected: bool = False,
               sources: Optional[Mapping[str, str]] = None) -> Dict[str, np.ndarray]:
  """Returns {key: loaded array} for the expected keys present in `loaded`.

  loaded: converted checkpoint, flat; expected: flat tree of arrays / ShapeDtypeStructs;
  what: names the checkpoint in messages; sources: converted key -> the checkpoint's own name.
  Raises ValueError naming every missing, unexpected (unless allowed) and mis-shaped key.
  """
  missing = sorted(set(expected) - set(loaded))
  unexpected = sorted(set(loaded) - set(expected))
  mismatched = sorted(k for k in set(loaded) & set(expected)
                      if tuple(np.shape(loaded[k])) != tuple(expected[k].shape))
  problems = []
  if mismatched:
    problems.append('shape mismatch: ' + ', '.join(
        f'{k} checkpoint {tuple(np.shape(loaded[k]))} vs model {tuple(expected[k].shape)}'
        + (f' (from {sources[k]!r})' if sources and k in sources else '') for k in mismatched))
  if missing and not allow_missing:
    problems.append(f'missing {len(missing)} (set model.allow_missing_keys=True to keep their '
                    f'initial values): {_names(missing, sources)}')
  if unexpected and not allow_unexpected:
    problems.append(f'unexpected {len(unexpected)} (set model.allow_unexpected_keys=True to '
                    f'ignore them): {_names(unexpected, sources)}')
  if problems:
    raise ValueError(f'{what} does not match the model:\n  ' + '\n  '.join(problems))
  if missing:
    logging.warning('%s: %d missing keys keep their initial values: %s', what, len(missing),
                    ', '.join(missing))
  if unexpected:
    logging.warning('%s: %d unexpected keys ignored: %s', what, len(unexpected),
                    _names(unexpected, sources))
  return {k: loaded[k] for k in expected if k in loaded}


def merge(initial, loaded_flat: Mapping[str, np.ndarray]):
  """`initial` (a tree) with the loaded keys replaced, each cast to the initial dtype.

  A missing key keeps its initial value (left out where `initial` is abstract).
  """
  out = {}
  for k, v in flatten(initial).items():
    if k in loaded_flat:
      out[k] = np.asarray(loaded_flat[k], dtype=v.dtype)
    elif not hasattr(v, '__array__'):  # abstract (ShapeDtypeStruct): nothing to keep
      continue
    else:
      out[k] = np.asarray(v)
  return unflatten(out)
