"""The ablation rows of the paper's tables II-IV, trained with one recipe over several seeds.

  python -m benchmarks.ablations --config=configs/synthetic.py --workdir=/tmp/ablations \
      --seeds=0,1,2 [--rows=full,nq1,...] [--config.train.num_steps=...]

Every row of ROWS is the given config with the row's overrides (and config.seed = the seed),
nothing else tuned per row, trained and validated by `trainer.train_and_evaluate` in
<workdir>/<row>/seed_<s>. The runs go seed by seed (every row of seed 0, then of seed 1, ...), so a
grid cut short still compares the rows. A synthetic data set with no data_dir is generated once
per seed under <workdir>/data/seed_<s> and shared by the rows. A row whose overrides the config
already has repeats full (a note says so).

Resume: a run's <workdir>/<row>/seed_<s>/result.json (its validation metrics, written atomically
when it finished) skips it on the next call; a run killed mid-way continues from its own
checkpoints. At the end the table (mean ± sample std over the seeds) is printed and written, with
every seed's numbers, to <workdir>/ablations.json. docs/ablations.md.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eavl_jax import malloc  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  malloc.restart_with_malloc_tunables()   # before the heavy imports, so that they run once

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from benchmarks import common
from eavl_jax import cli as command_line   # `cli` is this module's own function
from eavl_jax import config_check
from eavl_jax import input_pipeline
from eavl_jax import run_sizes
from eavl_jax import synthetic_task
from eavl_jax import trainer
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS

# name -> (description, {dotted config key: value}); the table's order.
ROWS = {
    'full': ('the config as given (full model)', {}),
    'nq1': ('N_q = 1 query (table II)', {'model.num_queries': 1}),
    'nq8': ('N_q = 8 queries (table II)', {'model.num_queries': 8}),
    'fixed_kernel': ('one learned 3x3 kernel, no aligner (table III)',
                     {'model.aligner.mode': 'fixed'}),
    'no_estimator': ('equal query weights 1/N_q, no estimator (table III)',
                     {'model.aligner.use_estimator': False}),
    'no_global_text': ('neck without F_tg, eq. 2 (table IV)',
                       {'model.neck.use_global_text': False}),
    'no_global_vision': ('query generator without F_vg, eq. 8 (table IV)',
                         {'model.query_generator.use_global_vision': False}),
    'lavt': ('LAVT, its fixed 1x1 classifier (table V)',   # model.lavt.head: 'fixed' in base
             {'model.name': 'lavt'}),
    'lavt_aligner': ('LAVT + the aligner, queries from its features (table V)',
                     {'model.name': 'lavt', 'model.lavt.head': 'aligner'}),
}
# Without --rows: tables II-IV. Table V: --rows=full,lavt,lavt_aligner (docs/lavt.md).
DEFAULT_ROWS = ('full', 'nq1', 'nq8', 'fixed_kernel', 'no_estimator', 'no_global_text',
                'no_global_vision')
RESULT_FILE = 'result.json'
SUMMARY_FILE = 'ablations.json'
# Fractions in the trainer's metrics, in % here. mIoU, oIoU: mean ± std over the seeds. The query
# diversity (eavl_jax/metrics.py; the trainer's qIoU and S-ent): mean only, where reported.
MEAN_STD_KEYS = ('mIoU', 'oIoU')
MEAN_KEYS = ('query_mask_iou', 'score_entropy')
IGNORED_CONFIG_KEYS = ('data.data_dir',)   # may move with the workdir; the data's seed is config's


class RunIncompleteError(RuntimeError):
  """train_and_evaluate returned before its last step."""


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Runs (<workdir>/<row>/seed_<s>), data and the summary.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Comma-separated seeds (config.seed of each run).')
  flags.DEFINE_list('rows', list(DEFAULT_ROWS), f'Comma-separated rows, of: {",".join(ROWS)}.')


# ------------------------------------------------------------------ input


def parse_seeds(values):
  """['0', '1'] (or '0,1') -> [0, 1]; ValueError on an empty, non-integer, negative or repeated
  seed."""
  if isinstance(values, str):
    values = values.split(',')
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    raise ValueError(f'--seeds={",".join(values)}: not a list of integers') from None
  if not seeds:
    raise ValueError('--seeds is empty: give one or more, e.g. --seeds=0,1,2')
  if min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise ValueError(f'--seeds={",".join(values)}: seeds must be distinct and >= 0')
  return seeds


def check_rows(names):
  """-> the row names, in the order given; ValueError on an unknown or repeated name."""
  names = list(names)
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    raise ValueError(f'unknown row(s) {",".join(unknown)}; the rows are: {",".join(ROWS)}')
  if not names or len(set(names)) != len(names):
    raise ValueError(f'--rows={",".join(names)}: give distinct rows, of: {",".join(ROWS)}')
  return names


# ------------------------------------------------------------------ configs


def _parent_and_key(config, dotted):
  *path, key = dotted.split('.')
  parent = config
  for part in path:
    parent = parent[part]
  if key not in parent:
    raise KeyError(f'{dotted}: no such config key')
  return parent, key


def row_config(config, row, seed):
  """A copy of `config` with the row's overrides and config.seed = seed."""
  c = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in ROWS[row][1].items():
    parent, key = _parent_and_key(c, dotted)
    parent[key] = value
  c.seed = seed
  c.lock()
  return c


def unchanged_overrides(config, row):
  """The row's overrides that `config` already has (a row with only those repeats 'full')."""
  same = []
  for dotted, value in ROWS[row][1].items():
    parent, key = _parent_and_key(config, dotted)
    if parent[key] == value:
      same.append(dotted)
  return same


def _flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def comparable_config(config):
  """Flat {dotted key: JSON value} of a config, minus IGNORED_CONFIG_KEYS."""
  flat = _flat(json.loads(json.dumps(config.to_dict(), default=str)))
  return {k: v for k, v in flat.items() if k not in IGNORED_CONFIG_KEYS}


def check_same_config(saved, config, path):
  """ValueError when a finished run's result.json was trained with another config."""
  now = comparable_config(config)
  changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
  if changed:
    diffs = ', '.join(f'{k}: {saved.get(k)!r} -> {now.get(k)!r}' for k in changed[:5])
    raise ValueError(f'{path} was trained with another config ({diffs}): use another --workdir, '
                     'or delete that run to train it again')


# ------------------------------------------------------------------ runs


def run_dir(workdir, row, seed):
  return os.path.join(workdir, row, f'seed_{seed}')


def read_result(directory):
  """The run's result dict, or None when it has not finished."""
  path = os.path.join(directory, RESULT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path, value):
  """Atomically: a reader (or a crash) never sees half a file."""
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1, default=lambda x: x.item() if hasattr(x, 'item') else str(x))
  os.replace(tmp, path)


def latest_checkpoint_step(directory):
  """The highest step saved under <directory>/checkpoints (orbax's <step> folders), or 0."""
  root = os.path.join(directory, 'checkpoints')
  steps = [int(n) for n in os.listdir(root) if n.isdigit()] if os.path.isdir(root) else []
  return max(steps, default=0)


def seed_data_dir(config, workdir, seed):
  """-> data.data_dir of the runs of `seed`: a synthetic data set with no data_dir is generated
  from that seed once, under <workdir>/data/seed_<seed>/data (synthetic_task.prepare, which also
  refuses data of another synthetic_images / seed there); otherwise the config's data_dir."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.seed = seed
  c = synthetic_task.prepare(c, os.path.join(workdir, 'data', f'seed_{seed}'))
  return c.data.data_dir


def train_run(config, directory, row, seed):
  """Trains and validates one run (resuming from its checkpoints); writes its result.json."""
  start = time.perf_counter()
  metrics = trainer.train_and_evaluate(config, directory)
  wall = time.perf_counter() - start
  total = run_sizes.compute(
      config, input_pipeline.num_examples(config, config.data.train_split)).total_steps
  step = latest_checkpoint_step(directory)
  if metrics is None or step < total:
    raise RunIncompleteError(f'{directory} stopped at step {step} of {total} (preempted?): run '
                             'the same command again to continue it')
  result = dict(metrics, row=row, seed=seed, steps=step, wall_seconds=wall,
                config=comparable_config(config))
  write_json(os.path.join(directory, RESULT_FILE), result)
  return result


def _pending_runs(workdir, rows, seeds):
  """(row, seed) of every run without a result.json, seed by seed."""
  return [(row, seed) for seed in seeds for row in rows
          if read_result(run_dir(workdir, row, seed)) is None]


def _check_finished_runs(config, workdir, rows, seeds):
  """Every finished run must have been trained with the config it would be trained with now."""
  for seed in seeds:
    for row in rows:
      directory = run_dir(workdir, row, seed)
      result = read_result(directory)
      if result is not None:
        check_same_config(result.get('config', {}), row_config(config, row, seed),
                          os.path.join(directory, RESULT_FILE))


def _no_op_rows(config, rows):
  """Rows whose every override the config already has: their runs repeat those of full."""
  return [row for row in rows if ROWS[row][1]
          and unchanged_overrides(config, row) == list(ROWS[row][1])]


def _train_pending(config, workdir, pending):
  """Trains the (row, seed) runs of `pending`; -> {'<row>/seed_<s>': error} of those whose loss
  turned non-finite (reported; the others go on)."""
  failed, data_dirs = {}, {}
  for i, (row, seed) in enumerate(pending):
    tag = f'[{i + 1}/{len(pending)}] {row} seed {seed}'
    if seed not in data_dirs:
      data_dirs[seed] = seed_data_dir(config, workdir, seed)
    run_config = row_config(config, row, seed)
    run_config.data.data_dir = data_dirs[seed]
    directory = run_dir(workdir, row, seed)
    print(f'{tag}: training in {directory}', flush=True)
    try:
      result = train_run(run_config, directory, row, seed)
    except trainer.NonFiniteLossError as e:
      failed[f'{row}/seed_{seed}'] = str(e)
      print(f'{tag}: FAILED: {e}', flush=True)
      continue
    print(f'{tag}: val mIoU {100 * result["mIoU"]:.2f} % in {result["wall_seconds"]:.0f} s',
          flush=True)
  return failed


def run_grid(config, workdir, rows, seeds):
  """Trains every (row, seed) without a result.json, then prints the table and writes
  <workdir>/ablations.json. -> the summary dict (what ablations.json holds).

  Raises ValueError (bad rows / seeds / config, or a finished run of another config) before any
  training; trainer.Preempted when a run was stopped by a signal (its step saved).
  """
  start = time.perf_counter()
  rows, seeds = check_rows(rows), parse_seeds(seeds)
  for row in rows:   # every key of every row's config, before any data or training
    config_check.validate(row_config(config, row, seeds[0]), training=True)
  if config.train.eval_every_steps <= 0:
    raise ValueError('train.eval_every_steps must be > 0: the rows are compared on validation')
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _check_finished_runs(config, workdir, rows, seeds)
  no_op = _no_op_rows(config, rows)
  for row in no_op:
    print(f'note: {row} changes nothing in this config: its runs repeat those of full', flush=True)
  failed = _train_pending(config, workdir, _pending_runs(workdir, rows, seeds))
  summary = summarize(workdir, rows, seeds, time.perf_counter() - start, failed)
  summary['rows_repeating_full'] = no_op
  write_json(os.path.join(workdir, SUMMARY_FILE), summary)
  print(format_table(summary), flush=True)
  return summary


# ------------------------------------------------------------------ summary


def _mean_std(values):
  """-> (mean, sample std with ddof=1, or None for fewer than 2 values); (None, None) if none."""
  if not values:
    return None, None
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return float(np.mean(values)), std


def summarize_row(workdir, row, seeds):
  """{description, overrides, seeds_done, runs: {seed: metrics}, summary: {...}} of one row."""
  runs = {}
  for seed in seeds:
    result = read_result(run_dir(workdir, row, seed))
    if result is not None:
      runs[str(seed)] = {k: v for k, v in result.items() if k != 'config'}
  stats = {'n': len(runs)}
  for key in MEAN_STD_KEYS + MEAN_KEYS:
    values = [100.0 * r[key] for r in runs.values() if r.get(key) is not None]
    mean, std = _mean_std(values)
    stats[f'{key}_mean'] = mean
    if key in MEAN_STD_KEYS:
      stats[f'{key}_std'] = std
  description, overrides = ROWS[row]
  return dict(description=description, overrides=overrides, seeds_done=sorted(int(s) for s in runs),
              runs=runs, summary=stats)


def summarize(workdir, rows, seeds, wall_seconds, failed):
  """The grid's summary: per row its seeds' numbers and their mean ± std, in %."""
  out_rows = {row: summarize_row(workdir, row, seeds) for row in rows}
  full = out_rows.get('full', {}).get('summary', {}).get('mIoU_mean')
  for r in out_rows.values():
    mean = r['summary']['mIoU_mean']
    r['summary']['mIoU_delta_to_full'] = (mean - full if None not in (mean, full) else None)
  train_seconds = sum(run['wall_seconds'] for r in out_rows.values() for run in r['runs'].values())
  return dict(cpu=common.cpu_model(), wall_seconds=wall_seconds, train_seconds=train_seconds,
              seeds=seeds, rows=out_rows, failed=failed,
              units='in % (runs: fractions, as the trainer returns them); std: sample std '
                    '(ddof=1) over the seeds, None for one seed; mIoU_delta_to_full: points of '
                    'mean mIoU against the row full')


def _cell(mean, std=None):
  if mean is None:
    return '-'
  return f'{mean:.2f}' if std is None else f'{mean:.2f} ± {std:.2f}'


COLUMNS = ('row', 'description', 'seeds', 'mIoU %', 'oIoU %', 'qIoU %', 'S-ent %', 'ΔmIoU')


def table_cells(summary, name):
  """The table's cells of one row, as strings."""
  r = summary['rows'][name]
  s = r['summary']
  delta = s['mIoU_delta_to_full']
  return (name, r['description'], f'{s["n"]}/{len(summary["seeds"])}',
          _cell(s['mIoU_mean'], s['mIoU_std']), _cell(s['oIoU_mean'], s['oIoU_std']),
          _cell(s['query_mask_iou_mean']), _cell(s['score_entropy_mean']),
          '-' if delta is None else f'{delta:+.2f}')


def format_table(summary):
  """Header (CPU, wall time) and one line per row; columns are 2+ spaces apart."""
  lines = [table_cells(summary, name) for name in summary['rows']]
  widths = [max(len(c[i]) for c in [COLUMNS] + lines) for i in range(len(COLUMNS))]
  fmt = lambda cells: '  '.join(c.ljust(w) if i < 2 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
  head = (f'ablations on {summary["cpu"]}: wall {summary["wall_seconds"]:.1f} s this call, '
          f'{summary["train_seconds"]:.1f} s of training in the runs done')
  legend = ('validation, in %: mean ± sample std (ddof=1) over the seeds; qIoU (IoU between the '
            'query masks), S-ent (normalised entropy of the query scores): means; ΔmIoU: points '
            'against full')
  out = [head, legend, fmt(COLUMNS)] + [fmt(c) for c in lines]
  out += [f'note: {row} changes nothing in this config: its runs repeat those of full'
          for row in summary.get('rows_repeating_full', ())]
  out += [f'FAILED {run}: {message}' for run, message in summary['failed'].items()]
  return '\n'.join(out)


# ------------------------------------------------------------------ main


def cli(config, workdir, rows, seeds):
  """The command: bad input -> one line 'error: ...' and exit 2 before any training; a failed
  or refused grid -> 'error: ...' / FAILED lines and exit 1; a signal -> the run's step saved and
  exit trainer.EXIT_PREEMPTED; else exit 0."""
  if config is None or not workdir:
    _exit_with_error('--config and --workdir are required', 2)
  try:
    rows, seeds = check_rows(rows), parse_seeds(seeds)
  except ValueError as e:
    _exit_with_error(str(e), 2)
  try:
    summary = run_grid(config, workdir, rows, seeds)
  except trainer.Preempted as e:   # the same command continues the grid
    print(f'preempted ({e}); exit code {trainer.EXIT_PREEMPTED}', file=sys.stderr, flush=True)
    sys.exit(trainer.EXIT_PREEMPTED)
  except (RunIncompleteError, ValueError, KeyError, FileNotFoundError) as e:
    _exit_with_error(str(e), 1)
  sys.exit(1 if summary['failed'] else 0)


def _exit_with_error(message, code):
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    _exit_with_error(f'unexpected arguments: {argv[1:]}', 2)
  command_line.quiet_libraries()
  cli(FLAGS.config, FLAGS.workdir, FLAGS.rows, FLAGS.seeds)


if __name__ == '__main__':
  define_flags()
  jax.config.config_with_absl()
  app.run(main, flags_parser=command_line.parse_flags)
