"""LAVT on G-Ref, Google partition (train and val only).

configs/lavt_refcoco.py (LAVT's settings; its 20 tokens on every data set, as its ReferDataset)
on this data set. Evaluating LAVT's released weights (docs/lavt.md):

  python -m eavl_jax.evaluate --config=configs/lavt_refcocog_google.py --workdir=DIR --released \
      --config.model.lavt.pretrained=/data/lavt/<file>.pth --config.eval.protocol=lavt
"""
from configs import lavt_refcoco


def get_config():
  c = lavt_refcoco.get_config()
  c.data.dataset = 'refcocog_google'
  c.data.eval_splits = ('val',)
  return c
