"""Time per train batch of a config's in-process grain loader (what the train loop's thread
spends beside the jitted step), with and without the tokenizer-ids cache and reader threads.

  python benchmarks/train_loader.py [--config=configs/synthetic.py] [--workdir=/tmp/eavl_synthetic]
      [--batches=200]

Builds the config's data under --workdir like the train command (the synthetic set when absent).
Each variant yields the same batches (checked: one digest over all of them); the table prints
ms per batch after a first epoch (the cache is full from the second epoch on; the embedded
default trains 11), median of three passes taken in turn.
"""
import hashlib
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from eavl_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from eavl_jax import synthetic_task  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'Experiment config file.')
  flags.DEFINE_string('workdir', '/tmp/eavl_synthetic', 'where the data are (built if absent)')
  flags.DEFINE_integer('batches', 200, 'timed batches per pass')


def _pass(config, read_threads, cache, batches, warmup):
  """-> (seconds per batch, digest of the batches) of one fresh loader."""
  config = config.copy_and_resolve_references()
  config.data.read_threads = read_threads
  input_pipeline.Tokenize.CACHE_SIZE = (1 << 18) if cache else 0
  it = input_pipeline.make_train_loader(config, seed=config.seed, shard_index=0, shard_count=1,
                                        batch_size=config.train.global_batch_size)
  digest = hashlib.sha256()
  for _ in range(warmup):                    # one epoch: tokenizer load, every sentence cached
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
    for k in sorted(batch):
      digest.update(np.ascontiguousarray(batch[k]).tobytes())
  return (time.perf_counter() - start) / batches, digest.hexdigest()


def main(argv):
  del argv
  config = synthetic_task.prepare(FLAGS.config, FLAGS.workdir)
  variants = [('grain defaults (16 reader threads), HF tokenizer call per sample', 16, False),
              ('16 reader threads, ids cached per sentence', 16, True),
              ('records read in the loader thread, ids cached (configs/tiny.py)', 0, True)]
  batch_size = config.train.global_batch_size
  epoch = -(-input_pipeline.num_examples(config, config.data.train_split) // batch_size)
  times = {v[0]: [] for v in variants}
  digests = set()
  for _ in range(3):
    for name, threads, cache in variants:
      seconds, digest = _pass(config, threads, cache, FLAGS.batches, epoch)
      times[name].append(seconds)
      digests.add(digest)
  print(common.machine_line())
  print(f'{FLAGS.batches} train batches of {batch_size} after a first epoch of {epoch} '
        f'({config.data.dataset}, refs_per_image={config.data.refs_per_image}); '
        f'same batches in every variant: {len(digests) == 1}')
  base = np.median(times[variants[0][0]])
  print(f'{"variant":<68} {"ms/batch":>9} {"vs first":>9}')
  for name, _, _ in variants:
    t = np.median(times[name])
    print(f'{name:<68} {t * 1e3:9.1f} {base / t:8.2f}x')
  if len(digests) != 1:
    raise SystemExit('the variants gave different batches')


if __name__ == '__main__':
  define_flags()
  app.run(main)
