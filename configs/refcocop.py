"""RefCOCO+ (UNC splits), the paper's setting."""
from configs import base


def get_config():
  c = base.get_config()
  c.data.dataset = 'refcocop'
  c.data.eval_splits = ('val', 'testA', 'testB')
  c.model.max_tokens = 17
  return c
