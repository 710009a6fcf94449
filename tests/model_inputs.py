"""A random batch shaped for a model config: the tests of EAVL (test_model.py) and LAVT
(test_lavt.py) share it."""
import numpy as np


def random_batch(model_config, batch_size, seed=0):
  """-> image (B,S,S,3), input_ids (B,L) ([CLS] ... [SEP], zero padding), attention_mask (B,L),
  mask (B,S,S) uint8, drawn from `seed`."""
  rng = np.random.default_rng(seed)
  s, l = model_config.image_size, model_config.max_tokens
  image = rng.normal(size=(batch_size, s, s, 3)).astype(np.float32)
  lengths = rng.integers(3, l + 1, size=batch_size)
  input_ids = rng.integers(1000, 5000, size=(batch_size, l)).astype(np.int32)
  attention_mask = (np.arange(l)[None] < lengths[:, None]).astype(np.int32)
  input_ids[:, 0] = 101
  input_ids[np.arange(batch_size), lengths - 1] = 102
  input_ids *= attention_mask
  mask = (rng.random((batch_size, s, s)) < 0.3).astype(np.uint8)
  return image, input_ids, attention_mask, mask
