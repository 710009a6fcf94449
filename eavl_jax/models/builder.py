"""The one place that makes a model from `config.model`: EAVL, or LAVT (table V, docs/lavt.md)."""
import flax.linen as nn
import ml_collections
import numpy as np

from eavl_jax.models import eavl
from eavl_jax.models import lavt

MODELS = {'eavl': eavl.EAVL, 'lavt': lavt.LAVT}   # model.name -> its module


def validate_config(m):
  """Raises ValueError naming the field for a model config that cannot be built."""
  if m.name not in MODELS:
    raise ValueError(f'model.name={m.name!r}: must be one of {tuple(MODELS)}')
  eavl.validate_config(m)        # the fields both models share
  if m.name == 'lavt':
    lavt.validate_config(m)


def build_model(model_config) -> nn.Module:
  """The model of `model_config` as given: with a pretrained BERT, the caller first takes the
  text-encoder sizes from its config.json (weights.with_checkpoint_text_sizes)."""
  validate_config(model_config)
  return MODELS[model_config.name](ml_collections.FrozenConfigDict(model_config))


def dummy_inputs(model_config, batch_size):
  """Zero image, [CLS] [SEP] expression: the shapes the model is built for."""
  s, l = model_config.image_size, model_config.max_tokens
  image = np.zeros((batch_size, s, s, 3), np.float32)
  input_ids = np.zeros((batch_size, l), np.int32)
  input_ids[:, 0], input_ids[:, 1] = 101, 102
  attention_mask = np.zeros((batch_size, l), np.int32)
  attention_mask[:, :2] = 1
  return image, input_ids, attention_mask
