"""LAVT on the synthetic referring task with the recipe of configs/synthetic.py (its data, sizes,
optimizer, loss and steps; nothing tuned for LAVT): the row `lavt` of table V's analogue
(benchmarks/ablations.py, docs/lavt.md).

  python -m eavl_jax.train --config=configs/lavt_synthetic.py --workdir=/tmp/lavt_synthetic
"""
from configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.model.name = 'lavt'
  c.model.lavt.head = 'fixed'
  return c
