"""G-Ref, Google partition (train and val only), 22 tokens."""
from configs import base


def get_config():
  c = base.get_config()
  c.data.dataset = 'refcocog_google'
  c.data.eval_splits = ('val',)
  c.model.max_tokens = 22
  return c
