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
  # Eq. 9 as the paper writes it, as when docs/lavt.md's rows were measured (the aligner head of
  # configs/lavt_aligner_synthetic.py uses the query generator; the fixed head does not).
  c.model.query_generator.normalize_word_attention = False
  c.model.query_generator.scale_word_attention = False
  return c
