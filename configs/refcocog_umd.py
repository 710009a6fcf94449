"""G-Ref, UMD partition (the one the paper reports), 22 tokens."""
from configs import base


def get_config():
  c = base.get_config()
  c.data.dataset = 'refcocog_umd'
  c.data.eval_splits = ('val', 'test')
  c.model.max_tokens = 22
  return c
