"""Evaluates a checkpoint on every split of the config's data set: oIoU, mIoU, Pr@0.5 ... Pr@0.9.

  python -m eavl_jax.evaluate --config=configs/refcoco.py --workdir=DIR \
      [--checkpoint=STEP_OR_PATH | --best | --released] [--splits=val,testA] [--batch_size=32]

Default checkpoint: the latest of DIR/checkpoints; --best: the best validation mIoU; --checkpoint:
a step of DIR, or a checkpoint folder `<other workdir>/checkpoints/<step>`; --released: no training
run, the released LAVT weights config.model.lavt.pretrained names (a LAVT-RIS .pth,
docs/lavt.md). The metrics are those
of docs/evaluation.md (every sentence a sample; eavl_jax/metrics.py), scored under
config.eval.protocol ('original': each image's own size; 'lavt': the input size).
Prints tables laid out like the paper's tables I and II (in %), then the query diversity of every
split (metrics.DIVERSITY_KEYS: mean pairwise IoU of the query masks, normalised entropy of the
estimator's scores), and writes the same numbers (fractions) to
DIR/eval/<step>.<dataset>.<protocol>.<data_dir digest>.json (json_path): one file per checkpoint,
data set and protocol. Each JSON also holds 'scoring' (scoring.scoring_record): everything that
decides the digits (sizes, image / mask / token rules, upsampling, the records' build options).
Multi-host: as training (eavl_jax/distributed.py, launch/ with --module=evaluate;
docs/distributed.md).
"""
import hashlib
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax

from eavl_jax import cli
from eavl_jax import checkpointing
from eavl_jax import config_check
from eavl_jax import errors
from eavl_jax import scoring
from eavl_jax import metrics
from eavl_jax import sharding
from eavl_jax import steps
from eavl_jax import synthetic_task
from eavl_jax import weights
from eavl_jax import workdir as workdir_lib
from eavl_jax.models import builder
from eavl_jax.weights import lavt as lavt_weights

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  cli.define_config_flag()
  cli.define_checkpoint_flags('Training workdir; results go to <workdir>/eval.')
  flags.DEFINE_list('splits', None, 'Splits to evaluate; default config.data.eval_splits.')
  flags.DEFINE_integer('batch_size', None, 'Global eval batch; default '
                       'config.train.eval_batch_size.')
  flags.DEFINE_bool('released', False, 'Evaluate the released LAVT weights that '
                    'config.model.lavt.pretrained names (no training checkpoint).')
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
# LAVT-RIS README's results of the released `lavt` weights (cross-entropy, the paper's), in %:
# dataset -> split -> (P@0.5, P@0.6, P@0.7, P@0.8, P@0.9, overall IoU, mean IoU).
LAVT_README = {
    'refcoco': {'val': (84.46, 80.90, 75.28, 64.71, 34.30, 72.73, 74.46),
                'testA': (88.07, 85.17, 79.90, 68.52, 35.69, 75.82, 76.89),
                'testB': (79.12, 74.94, 69.17, 59.37, 34.45, 68.79, 70.94)},
    'refcocop': {'val': (74.44, 70.91, 65.58, 56.34, 30.23, 62.14, 65.81),
                 'testA': (80.68, 77.96, 72.90, 62.21, 32.36, 68.38, 70.97),
                 'testB': (65.66, 61.85, 55.94, 47.56, 27.24, 55.10, 59.23)},
    'refcocog_umd': {'val': (70.81, 65.28, 58.60, 47.49, 22.73, 61.24, 63.34),
                     'test': (71.54, 66.38, 59.00, 48.21, 23.10, 62.09, 63.62)},
    'refcocog_google': {'val': (71.16, 67.21, 61.76, 51.98, 27.30, 60.50, 63.66)},
}
LAVT_README_KEYS = ('Pr@0.5', 'Pr@0.6', 'Pr@0.7', 'Pr@0.8', 'Pr@0.9', 'oIoU', 'mIoU')
# metrics key -> metrics.lavt_test's (test.py's) name of the same number.
LAVT_TEST_NAMES = {'oIoU': 'overall IoU', 'mIoU': 'Mean IoU',
                   **{f'Pr@0.{k}': f'precision@0.{k}' for k in metrics.THRESHOLDS}}
DATASET_NAMES = {'refcoco': 'RefCOCO', 'refcocop': 'RefCOCO+', 'refcocog_umd': 'G-Ref (UMD)',
                 'refcocog_google': 'G-Ref (Google)', 'synthetic': 'synthetic'}
TABLE_II_KEYS = ('mIoU', 'Pr@0.5', 'Pr@0.6', 'Pr@0.7', 'Pr@0.8', 'Pr@0.9', 'oIoU')


def evaluate_splits(config, predict_fn, splits, **kwargs):
  """{split: metrics} for every split (kwargs as scoring.evaluate_split)."""
  return {split: scoring.evaluate_split(config, predict_fn, split, **kwargs)[0]
          for split in splits}


def percent(result, key):
  """A metric of one split in %, as printed: under protocol 'lavt' test.py's own number (its
  arithmetic, metrics.lavt_test), else 100 x the fraction."""
  if 'lavt_test' in result:
    return result['lavt_test'][LAVT_TEST_NAMES[key]]
  return 100 * result[key]


def reference_rows(dataset, model):
  """{metric: {split: %}} to print beside ours: LAVT's README for model 'lavt', else the
  paper's EAVL rows (table I); with its label."""
  if model == 'lavt':
    rows = LAVT_README.get(dataset, {})
    return {k: {s: v[i] for s, v in rows.items()}
            for i, k in enumerate(LAVT_README_KEYS)}, 'LAVT README'
  return PAPER_TABLE_I.get(dataset, {}), 'paper (EAVL)'


def format_tables(dataset, step, results, protocol, model='eavl'):
  """Table I layout (metric rows, split columns, the reference row beside ours: the paper's EAVL,
  or LAVT's README for model 'lavt'), table II layout (a row per split: mIoU, Pr@50 ... Pr@90,
  oIoU) and, where measured, the query diversity (a row per split: qIoU = query_mask_iou, S-ent =
  score_entropy; '-': not measured), in %; under protocol 'lavt' also test.py's printout per
  split. protocol: the header's second line (scoring.describe_protocol)."""
  splits = list(results)
  name = DATASET_NAMES.get(dataset, dataset)
  paper, label = reference_rows(dataset, model)
  col = lambda x: f'{x:>8}'
  lines = [f'{model.upper()} on {name}, checkpoint step {step}, in % (every sentence a sample)',
           protocol, '', 'Table I layout',
           f'{"metric":<7} {"model":<14}' + ''.join(col(s) for s in splits)]
  for metric in ('oIoU', 'mIoU'):
    lines.append(f'{metric:<7} {"eavl_jax":<14}'
                 + ''.join(col(f'{percent(results[s], metric):.2f}') for s in splits))
    if metric in paper:
      lines.append(f'{"":<7} {label:<14}'
                   + ''.join(col(f'{paper[metric][s]:.2f}' if s in paper[metric] else '-')
                             for s in splits))
  head = [k.replace('Pr@0.', 'Pr@') + ('0' if k.startswith('Pr@') else '') for k in TABLE_II_KEYS]
  lines += ['', 'Table II layout', f'{"split":<8}{"samples":>9}' + ''.join(col(h) for h in head)]
  for s in splits:
    lines.append(f'{s:<8}{results[s]["samples"]:>9}'
                 + ''.join(col(f'{percent(results[s], k):.2f}') for k in TABLE_II_KEYS))
  if any(k in results[s] for s in splits for k in metrics.DIVERSITY_KEYS):
    lines += ['', 'Query diversity (qIoU: mean IoU of the query mask pairs, S-ent: entropy of the '
              'scores / log N_q; 100: all masks alike / uniform scores)',
              f'{"split":<8}{"samples":>9}{col("qIoU")}{col("S-ent")}']
    for s in splits:
      lines.append(f'{s:<8}{results[s]["samples"]:>9}' + ''.join(
          col(f'{100 * results[s][k]:.2f}' if k in results[s] else '-')
          for k in metrics.DIVERSITY_KEYS))
  for s in splits:
    if 'lavt_test' in results[s]:
      lines += ['', f"{s}: LAVT's test.py would print", 'Final results:',
                metrics.lavt_test_printout(results[s]['lavt_test']).rstrip('\n')]
  return '\n'.join(lines)


def json_path(workdir, record):
  """DIR/eval/<step>.<dataset>.<protocol>.<digest>.json of a record {'step', 'dataset',
  'data_dir', 'protocol', 'checkpoint', 'scoring'}; digest: the first 8 hex digits of the SHA-256
  of the absolute data_dir. Another data set, data_dir or protocol never shares a file."""
  digest = hashlib.sha256(os.path.abspath(record['data_dir']).encode()).hexdigest()[:8]
  name = f'{record["step"]}.{record["dataset"]}.{record["protocol"]}.{digest}.json'
  return os.path.join(workdir_lib.eval_dir(workdir), name)


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


RELEASED_STEP = 'released'   # the step of a --released evaluation (its JSON's and table's)


def check_released(config):
  """--released needs a LAVT model and the file: one clear error otherwise."""
  m = config.model
  if m.name != 'lavt' or not m.lavt.pretrained:
    raise ValueError("--released evaluates the file model.lavt.pretrained names: it needs "
                     f"model.name='lavt' (got {m.name!r}) and model.lavt.pretrained set "
                     f'(got {m.lavt.pretrained!r})')


def released_variables(config, mesh):
  """The model's variables from the released LAVT file config.model.lavt.pretrained (LAVT-RIS's
  .pth, either layout; eavl_jax/weights/lavt.py), replicated over the mesh."""
  check_released(config)
  m = config.model
  model_config = weights.with_checkpoint_text_sizes(m)
  model = builder.build_model(model_config)
  inputs = builder.dummy_inputs(model_config, 1)
  initial = jax.device_get(jax.jit(lambda key: model.init(key, *inputs, train=False))(
      jax.random.key(config.seed)))
  loaded = lavt_weights.load_lavt(m.lavt.pretrained, initial, model_config)
  return jax.device_put(loaded, sharding.replicated(mesh))


def warn_if_not_lavts_records(scoring):
  """Protocol 'lavt' on records LAVT would not have read (pre-resized images, union masks): the
  numbers are not test.py's to the digit; says so in the log (the JSON's scoring records it)."""
  records = scoring['records']
  if scoring['protocol'] == 'lavt' and (records['resize_to'] or records['mask_rule'] != 'lavt'):
    logging.warning("eval.protocol='lavt' on records built with resize_to=%d, mask_rule=%r: LAVT "
                    "reads the original JPEGs and its own masks (data_prep.build without "
                    "--resize_to, with --mask_rule=lavt), so the digits may differ from its "
                    "test.py's", records['resize_to'], records['mask_rule'])


def run(config, workdir, *, checkpoint=None, best=False, splits=None, batch_size=None,
        released=False):
  """Restores (or, released=True, reads model.lavt.pretrained), evaluates every split, prints the
  tables and then writes the JSON (process 0) -> (step, results, json path)."""
  workdir = os.path.abspath(workdir)
  config_check.validate(config)   # every key, before the data are read or generated
  if released and (checkpoint is not None or best):
    raise ValueError('give --released (the file model.lavt.pretrained names) or --checkpoint / '
                     '--best, not both')
  if released:
    check_released(config)   # before the data are read or generated
  if jax.process_index() == 0:   # where the results go, before the evaluation
    workdir_lib.check_writable(workdir_lib.eval_dir(workdir))
  config = synthetic_task.prepare(config, workdir)   # synthetic: the records under workdir/data
  splits = list(splits or config.data.eval_splits)
  if not splits:
    raise ValueError('no split to evaluate: give --splits or set config.data.eval_splits')
  mesh = sharding.make_mesh(config.mesh)
  if released:
    variables, step = released_variables(config, mesh), RELEASED_STEP
    source = os.path.abspath(config.model.lavt.pretrained)
  else:
    variables, step = checkpointing.restore_variables(config, workdir, checkpoint, best)
    ckpt_workdir, _ = checkpointing.parse_checkpoint(workdir, checkpoint)
    source = os.path.join(ckpt_workdir, 'checkpoints', str(step))
  record = {'step': step, 'dataset': config.data.dataset,
            'data_dir': os.path.abspath(config.data.data_dir), 'protocol': config.eval.protocol,
            'checkpoint': source, 'scoring': scoring.scoring_record(config)}
  warn_if_not_lavts_records(record['scoring'])
  path = json_path(workdir, record)
  read_splits(path, record)   # another record's file: an error before the evaluation
  predict = steps.make_predict_fn(
      builder.build_model(weights.with_checkpoint_text_sizes(config.model)))
  results = evaluate_splits(config, lambda batch: predict(variables, batch), splits, mesh=mesh,
                            batch_size=batch_size)
  if jax.process_index() == 0:   # the tables first: a failed write loses nothing
    print(format_tables(config.data.dataset, step, results, scoring.describe_protocol(config),
                        config.model.name), flush=True)
    try:
      write_json(path, record, results)
    except OSError as e:
      raise ValueError(f'{path}: the results could not be written ({e.strerror or e}); the '
                       'tables above hold them') from None
  return step, results, path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.drop_closed_loop_noise()   # a damaged checkpoint: one error line
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError('--config and --workdir are required')
  from eavl_jax import distributed  # pylint: disable=g-import-not-at-top  (see define_flags)
  distributed.initialize()
  config = FLAGS.config
  try:
    step, results, path = run(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, best=FLAGS.best,
                              splits=FLAGS.splits, batch_size=FLAGS.batch_size,
                              released=FLAGS.released)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(errors.error_message(e))
  del step, results   # printed by run
  if jax.process_index() == 0:
    print(f'\nwritten: {path}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
