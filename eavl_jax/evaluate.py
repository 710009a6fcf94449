"""Evaluates a checkpoint on every split of the config's data set: oIoU, mIoU, Pr@0.5 ... Pr@0.9.

  python -m eavl_jax.evaluate --config=configs/refcoco.py --workdir=DIR \
      [--checkpoint=STEP_OR_PATH | --best] [--splits=val,testA] [--batch_size=32]

Default checkpoint: the latest of DIR/checkpoints; --best: the best validation mIoU; --checkpoint:
a step of DIR, or a checkpoint folder `<other workdir>/checkpoints/<step>`. The metrics are those
of docs/evaluation.md (original image size, every sentence a sample; eavl_jax/metrics.py).
Prints tables laid out like the paper's tables I and II (in %), then the query diversity of every
split (metrics.DIVERSITY_KEYS: mean pairwise IoU of the query masks, normalised entropy of the
estimator's scores), and writes the same numbers (fractions) to DIR/eval/<step>.json.
Multi-host: as training (eavl_jax/distributed.py, launch/ with --module=evaluate;
docs/distributed.md).
"""
import json
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Training workdir; results go to <workdir>/eval.')
  flags.DEFINE_string('checkpoint', None, 'A step of --workdir, or a checkpoint folder '
                      '<workdir>/checkpoints/<step>. Default: the latest.')
  flags.DEFINE_bool('best', False, 'The checkpoint with the best validation mIoU.')
  flags.DEFINE_list('splits', None, 'Splits to evaluate; default config.data.eval_splits.')
  flags.DEFINE_integer('batch_size', None, 'Global eval batch; default '
                       'config.train.eval_batch_size.')
  # --distributed, --coordinator_address, --num_processes, --process_id, --local_device_ids:
  from eavl_jax import distributed  # pylint: disable=g-import-not-at-top,unused-import


# The paper's EAVL (Swin-B, BERT-B) rows of table I, in %: dataset -> metric -> split -> value.
PAPER_TABLE_I = {
    'refcoco': {'oIoU': {'val': 75.55, 'testA': 77.50, 'testB': 71.53},
                'mIoU': {'val': 77.08, 'testA': 78.52, 'testB': 73.49}},
    'refcocop': {'oIoU': {'val': 65.38, 'testA': 70.12, 'testB': 57.75},
                 'mIoU': {'val': 67.95, 'testA': 72.17, 'testB': 61.24}},
    'refcocog_umd': {'oIoU': {'val': 64.17, 'test': 64.48},
                     'mIoU': {'val': 67.15, 'test': 67.68}},
}
DATASET_NAMES = {'refcoco': 'RefCOCO', 'refcocop': 'RefCOCO+', 'refcocog_umd': 'G-Ref (UMD)',
                 'refcocog_google': 'G-Ref (Google)', 'synthetic': 'synthetic'}
TABLE_II_KEYS = ('mIoU', 'Pr@0.5', 'Pr@0.6', 'Pr@0.7', 'Pr@0.8', 'Pr@0.9', 'oIoU')


def parse_checkpoint(workdir, checkpoint):
  """--checkpoint -> (workdir holding it, step or None)."""
  if checkpoint is None:
    return workdir, None
  if checkpoint.isdigit():
    return workdir, int(checkpoint)
  path = os.path.abspath(checkpoint.rstrip('/'))
  parent, name = os.path.split(path)
  if not name.isdigit() or os.path.basename(parent) != 'checkpoints':
    raise ValueError(f'--checkpoint={checkpoint!r}: expected a step number or a folder '
                     '<workdir>/checkpoints/<step>')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--checkpoint={checkpoint!r}: no such checkpoint folder')
  return os.path.dirname(parent), int(name)


def restore_variables(config, workdir, checkpoint=None, best=False):
  """-> (variables {'params', 'batch_stats'}, step) of the chosen checkpoint (clear errors: none there, another config)."""
  from eavl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  if best and checkpoint is not None:
    raise ValueError('give either --checkpoint or --best, not both')
  ckpt_workdir, step = parse_checkpoint(workdir, checkpoint)
  return checkpointing.restore_for_eval(config, ckpt_workdir, step=step, best=best)


def local_batch_size(batch_size, mesh):
  """Global eval batch -> this process's rows; it must split over processes and devices."""
  devices, processes = mesh.devices.size, jax.process_count()
  if batch_size < 1 or batch_size % devices or batch_size % processes:
    raise ValueError(f'eval batch size {batch_size} must be a positive multiple of the '
                     f'{devices} device(s) and {processes} process(es)')
  return batch_size // processes


def evaluate_split(config, predict_fn, split, *, mesh, batch_size=None, logits_on_canvas=False):
  """Metrics of one split (metrics.summarize): every sentence once, padding never counted.

  predict_fn(batch) -> logits (B, h, w) over the whole image (or (B, M, M) on the original-size
  canvas with logits_on_canvas=True), or the model's dict {'logits', 'masks', 'scores'} (then the
  result also holds metrics.DIVERSITY_KEYS); batch: global arrays sharded over the mesh.
  """
  from eavl_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from eavl_jax import metrics  # pylint: disable=g-import-not-at-top
  local = local_batch_size(batch_size or config.train.eval_batch_size, mesh)
  pc = jax.process_count()
  num_batches = metrics.num_eval_batches(input_pipeline.num_examples(config, split), pc, local)
  loader = input_pipeline.make_eval_loader(config, split, shard_index=jax.process_index(),
                                           shard_count=pc, batch_size=local)
  return metrics.evaluate_loader(predict_fn, loader, mesh=mesh, num_batches=num_batches,
                                 logits_on_canvas=logits_on_canvas)


def evaluate_splits(config, predict_fn, splits, **kwargs):
  """{split: metrics} for every split (kwargs as evaluate_split)."""
  return {split: evaluate_split(config, predict_fn, split, **kwargs) for split in splits}


def format_tables(dataset, step, results):
  """Table I layout (metric rows, split columns, the paper's EAVL row beside ours), table II
  layout (a row per split: mIoU, Pr@50 ... Pr@90, oIoU) and, where measured, the query diversity
  (a row per split: qIoU = query_mask_iou, S-ent = score_entropy; '-': not measured), in %."""
  from eavl_jax import metrics  # pylint: disable=g-import-not-at-top
  splits = list(results)
  name = DATASET_NAMES.get(dataset, dataset)
  paper = PAPER_TABLE_I.get(dataset, {})
  col = lambda x: f'{x:>8}'
  lines = [f'EAVL on {name}, checkpoint step {step}, in % (every sentence a sample)', '',
           'Table I layout', f'{"metric":<7} {"model":<14}' + ''.join(col(s) for s in splits)]
  for metric in ('oIoU', 'mIoU'):
    lines.append(f'{metric:<7} {"eavl_jax":<14}'
                 + ''.join(col(f'{100 * results[s][metric]:.2f}') for s in splits))
    if metric in paper:
      lines.append(f'{"":<7} {"paper (EAVL)":<14}'
                   + ''.join(col(f'{paper[metric][s]:.2f}' if s in paper[metric] else '-')
                             for s in splits))
  head = [k.replace('Pr@0.', 'Pr@') + ('0' if k.startswith('Pr@') else '') for k in TABLE_II_KEYS]
  lines += ['', 'Table II layout', f'{"split":<8}{"samples":>9}' + ''.join(col(h) for h in head)]
  for s in splits:
    lines.append(f'{s:<8}{results[s]["samples"]:>9}'
                 + ''.join(col(f'{100 * results[s][k]:.2f}') for k in TABLE_II_KEYS))
  if any(k in results[s] for s in splits for k in metrics.DIVERSITY_KEYS):
    lines += ['', 'Query diversity (qIoU: mean IoU of the query mask pairs, S-ent: entropy of the '
              'scores / log N_q; 100: all masks alike / uniform scores)',
              f'{"split":<8}{"samples":>9}{col("qIoU")}{col("S-ent")}']
    for s in splits:
      lines.append(f'{s:<8}{results[s]["samples"]:>9}' + ''.join(
          col(f'{100 * results[s][k]:.2f}' if k in results[s] else '-')
          for k in metrics.DIVERSITY_KEYS))
  return '\n'.join(lines)


def write_json(workdir, step, dataset, checkpoint_dir, results):
  """DIR/eval/<step>.json: {'step', 'dataset', 'checkpoint', 'splits': {split: metrics}}; splits
  evaluated earlier for the same step and data set are kept."""
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f'{step}.json')
  splits = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old.get('dataset') == dataset:
      splits = old.get('splits', {})
  splits.update(results)
  with open(path + '.tmp', 'w') as f:
    json.dump({'step': step, 'dataset': dataset, 'checkpoint': checkpoint_dir, 'splits': splits},
              f, indent=2)
  os.replace(path + '.tmp', path)
  return path


def run(config, workdir, *, checkpoint=None, best=False, splits=None, batch_size=None):
  """Restores, evaluates every split, writes the JSON (process 0) -> (step, results, json path)."""
  from eavl_jax import sharding  # pylint: disable=g-import-not-at-top
  from eavl_jax import trainer  # pylint: disable=g-import-not-at-top
  from eavl_jax.models import eavl  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  config = trainer.prepare_data(config, workdir)   # synthetic: the records under workdir/data
  splits = list(splits or config.data.eval_splits)
  if not splits:
    raise ValueError('no split to evaluate: give --splits or set config.data.eval_splits')
  variables, step = restore_variables(config, workdir, checkpoint, best)
  mesh = sharding.make_mesh(config.mesh)
  predict = trainer.make_predict_fn(eavl.build_model(config.model))
  results = evaluate_splits(config, lambda batch: predict(variables, batch), splits, mesh=mesh,
                            batch_size=batch_size)
  path = None
  if jax.process_index() == 0:
    ckpt_workdir, _ = parse_checkpoint(workdir, checkpoint)
    ckpt = os.path.join(ckpt_workdir, 'checkpoints', str(step))
    path = write_json(workdir, step, config.data.dataset, ckpt, results)
  return step, results, path


def error_message(e, limit=600):
  """'error: <message>' on one line (a multi-line message's lines joined by '; '), cut to `limit`
  characters: what the command line prints instead of a traceback."""
  text = ''
  for line in filter(None, (line.strip() for line in str(e).splitlines())):
    text += ('' if not text else ' ' if text.endswith(':') else '; ') + line
  return 'error: ' + (text if len(text) <= limit else text[:limit] + ' ...')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError('--config and --workdir are required')
  from eavl_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize()
  config = FLAGS.config
  try:
    step, results, path = run(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, best=FLAGS.best,
                              splits=FLAGS.splits, batch_size=FLAGS.batch_size)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(error_message(e))
  if jax.process_index() == 0:
    print(format_tables(config.data.dataset, step, results))
    print(f'\nwritten: {path}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
