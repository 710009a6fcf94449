"""LAVT + the aligner on the synthetic referring task, the recipe of configs/synthetic.py: the row
`lavt_aligner` of table V's analogue (benchmarks/ablations.py, docs/lavt.md).
"""
from configs import lavt_synthetic


def get_config():
  c = lavt_synthetic.get_config()
  c.model.lavt.head = 'aligner'
  return c
