"""Evaluates a checkpoint on every split of the config's data set: oIoU, mIoU, Pr@0.5 ... Pr@0.9.

  python -m eavl_jax.evaluate --config=configs/refcoco.py --workdir=DIR \
      [--checkpoint=STEP_OR_PATH | --best] [--splits=val,testA] [--batch_size=32]

Default checkpoint: the latest of DIR/checkpoints; --best: the best validation mIoU; --checkpoint:
a step of DIR, or a checkpoint folder `<other workdir>/checkpoints/<step>`. The metrics are those
of docs/evaluation.md (every sentence a sample; eavl_jax/metrics.py), scored under
config.eval.protocol ('original': each image's own size; 'lavt': the input size).
Prints tables laid out like the paper's tables I and II (in %), then the query diversity of every
split (metrics.DIVERSITY_KEYS: mean pairwise IoU of the query masks, normalised entropy of the
estimator's scores), and writes the same numbers (fractions) to
DIR/eval/<step>.<dataset>.<protocol>.<data_dir digest>.json (json_path): one file per checkpoint,
data set and protocol.
Multi-host: as training (eavl_jax/distributed.py, launch/ with --module=evaluate;
docs/distributed.md).
"""
import hashlib
import json
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from eavl_jax import checkpointing
from eavl_jax import config_check
from eavl_jax import errors
from eavl_jax import evaluation
from eavl_jax import metrics
from eavl_jax import sharding
from eavl_jax import trainer
from eavl_jax import weights
from eavl_jax.models import eavl

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
  # Defines flags on import: only when run as a program, so that importing this module adds none.
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


def evaluate_splits(config, predict_fn, splits, **kwargs):
  """{split: metrics} for every split (kwargs as evaluation.evaluate_split)."""
  return {split: evaluation.evaluate_split(config, predict_fn, split, **kwargs)[0]
          for split in splits}


def format_tables(dataset, step, results, protocol):
  """Table I layout (metric rows, split columns, the paper's EAVL row beside ours), table II
  layout (a row per split: mIoU, Pr@50 ... Pr@90, oIoU) and, where measured, the query diversity
  (a row per split: qIoU = query_mask_iou, S-ent = score_entropy; '-': not measured), in %.
  protocol: the header's second line (evaluation.describe_protocol)."""
  splits = list(results)
  name = DATASET_NAMES.get(dataset, dataset)
  paper = PAPER_TABLE_I.get(dataset, {})
  col = lambda x: f'{x:>8}'
  lines = [f'EAVL on {name}, checkpoint step {step}, in % (every sentence a sample)', protocol,
           '', 'Table I layout', f'{"metric":<7} {"model":<14}' + ''.join(col(s) for s in splits)]
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


def json_path(workdir, record):
  """DIR/eval/<step>.<dataset>.<protocol>.<digest>.json of a record {'step', 'dataset',
  'data_dir', 'protocol', 'checkpoint'}; digest: the first 8 hex digits of the SHA-256 of the
  absolute data_dir. Another data set, data_dir or protocol never shares a file."""
  digest = hashlib.sha256(os.path.abspath(record['data_dir']).encode()).hexdigest()[:8]
  name = f'{record["step"]}.{record["dataset"]}.{record["protocol"]}.{digest}.json'
  return os.path.join(workdir, 'eval', name)


def read_splits(path, record):
  """The splits already in `path` ({} if none); an error if that file holds another record's
  results (another checkpoint of the same step, or a digest collision)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    old = json.load(f)
  theirs = {k: old.get(k) for k in record}
  if theirs != record:
    raise ValueError(f'{path} holds the results of {theirs}, not of {record}: move that file '
                     'away or give another --workdir')
  return old['splits']


def write_json(path, record, results):
  """Writes {**record, 'splits': {split: metrics}} to path; the splits evaluated into it before
  are kept (a split evaluated again is replaced)."""
  splits = read_splits(path, record)
  splits.update(results)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump({**record, 'splits': splits}, f, indent=2)
  os.replace(path + '.tmp', path)
  return path


def run(config, workdir, *, checkpoint=None, best=False, splits=None, batch_size=None):
  """Restores, evaluates every split, writes the JSON (process 0) -> (step, results, json path)."""
  workdir = os.path.abspath(workdir)
  config_check.validate(config)   # every key, before the data are read or generated
  config = trainer.prepare_data(config, workdir)   # synthetic: the records under workdir/data
  splits = list(splits or config.data.eval_splits)
  if not splits:
    raise ValueError('no split to evaluate: give --splits or set config.data.eval_splits')
  variables, step = checkpointing.restore_variables(config, workdir, checkpoint, best)
  ckpt_workdir, _ = checkpointing.parse_checkpoint(workdir, checkpoint)
  record = {'step': step, 'dataset': config.data.dataset,
            'data_dir': os.path.abspath(config.data.data_dir), 'protocol': config.eval.protocol,
            'checkpoint': os.path.join(ckpt_workdir, 'checkpoints', str(step))}
  path = json_path(workdir, record)
  read_splits(path, record)   # another record's file: an error before the evaluation
  mesh = sharding.make_mesh(config.mesh)
  predict = trainer.make_predict_fn(
      eavl.build_model(weights.with_checkpoint_text_sizes(config.model)))
  results = evaluate_splits(config, lambda batch: predict(variables, batch), splits, mesh=mesh,
                            batch_size=batch_size)
  if jax.process_index() == 0:
    write_json(path, record, results)
  return step, results, path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError('--config and --workdir are required')
  from eavl_jax import distributed  # pylint: disable=g-import-not-at-top  (see define_flags)
  distributed.initialize()
  config = FLAGS.config
  try:
    step, results, path = run(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, best=FLAGS.best,
                              splits=FLAGS.splits, batch_size=FLAGS.batch_size)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(errors.error_message(e))
  if jax.process_index() == 0:
    print(format_tables(config.data.dataset, step, results, evaluation.describe_protocol(config)))
    print(f'\nwritten: {path}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
