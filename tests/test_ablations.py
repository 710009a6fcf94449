"""benchmarks/ablations.py: the grid of tables II-IV, end to end on the tiny config (2 rows x 2
seeds x 2 steps, its synthetic data generated per seed), its table against its JSON, resume after a
kill, and bad input refused before any training."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from benchmarks import ablations
from configs import base
from configs import synthetic
from configs import tiny
from eavl_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, SEEDS = ['full', 'nq1'], [0, 1]
OVERRIDES = {'train.num_steps': 2, 'data.synthetic_images': 12, 'data.eval_max_size': 128}


def tiny_config():
  """configs/tiny.py with OVERRIDES: the config the command line of `cli_grid` gives."""
  c = tiny.get_config()
  for dotted, value in OVERRIDES.items():
    section, key = dotted.split('.')
    c[section][key] = value
  return c


@pytest.fixture(scope='module')
def cli_grid(tmp_path_factory):
  """The command run once: -> (its CompletedProcess, its workdir)."""
  workdir = str(tmp_path_factory.mktemp('ablations'))
  args = [sys.executable, '-m', 'benchmarks.ablations', '--config=configs/tiny.py',
          f'--workdir={workdir}', f'--rows={",".join(ROWS)}',
          f'--seeds={",".join(map(str, SEEDS))}']
  args += [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return out, workdir


def parse_table(stdout):
  """{row: [cells]} of the printed table (columns are 2+ spaces apart)."""
  lines = stdout.splitlines()
  head = next(i for i, l in enumerate(lines) if l.startswith('row '))
  assert re.split(r'\s{2,}', lines[head]) == list(ablations.COLUMNS)
  table = {}
  for line in lines[head + 1:]:
    cells = re.split(r'\s{2,}', line.strip())
    if cells[0] in ablations.ROWS:
      table[cells[0]] = cells
  return table


def expected_cells(row):
  """The table's cells of `row` computed from the JSON summary."""
  s = row['summary']
  return [row['description'], f'{s["n"]}/{len(SEEDS)}',
          f'{s["mIoU_mean"]:.2f} ± {s["mIoU_std"]:.2f}',
          f'{s["oIoU_mean"]:.2f} ± {s["oIoU_std"]:.2f}',
          f'{s["query_mask_iou_mean"]:.2f}' if s['query_mask_iou_mean'] is not None else '-',
          f'{s["score_entropy_mean"]:.2f}' if s['score_entropy_mean'] is not None else '-',
          f'{s["mIoU_delta_to_full"]:+.2f}']


@pytest.mark.slow
def test_command_end_to_end_table_matches_json(cli_grid):
  out, workdir = cli_grid
  with open(os.path.join(workdir, ablations.SUMMARY_FILE)) as f:
    summary = json.load(f)
  assert 'wall' in out.stdout and summary['cpu'] in out.stdout   # the header line
  table = parse_table(out.stdout)
  assert list(table) == ROWS == list(summary['rows'])
  for name in ROWS:
    row = summary['rows'][name]
    assert table[name][1:] == expected_cells(row), (table[name], row['summary'])
    assert row['seeds_done'] == SEEDS
    mious = []
    for seed in SEEDS:
      directory = os.path.join(workdir, name, f'seed_{seed}')
      with open(os.path.join(directory, ablations.RESULT_FILE)) as f:
        result = json.load(f)
      assert (result['row'], result['seed'], result['steps']) == (name, seed, 2)
      assert result['wall_seconds'] > 0 and 0 <= result['mIoU'] <= 1
      mious.append(100 * result['mIoU'])
      with open(os.path.join(directory, 'config.json')) as f:   # the seed's own data, shared
        data_dir = json.load(f)['data']['data_dir']
      assert data_dir == os.path.join(workdir, 'data', f'seed_{seed}', 'data', 'tfds')
    assert row['summary']['mIoU_mean'] == pytest.approx(sum(mious) / len(mious))
  assert summary['rows']['full']['summary']['mIoU_delta_to_full'] == 0


@pytest.mark.slow
def test_killed_grid_resumes_without_redoing_finished_runs(cli_grid, tmp_path, monkeypatch):
  _, finished = cli_grid
  workdir = str(tmp_path / 'grid')
  shutil.copytree(finished, workdir)
  for name in ROWS:   # seed 1 of both rows as if never finished (their checkpoints stay)
    os.remove(os.path.join(workdir, name, 'seed_1', ablations.RESULT_FILE))
  real = trainer.train_and_evaluate
  calls = []

  def counting(config, run_workdir, crash_after=None):
    calls.append(os.path.relpath(run_workdir, workdir))
    if crash_after is not None and len(calls) > crash_after:
      raise KeyboardInterrupt('killed')
    return real(config, run_workdir)

  monkeypatch.setattr(trainer, 'train_and_evaluate', lambda c, w: counting(c, w, crash_after=1))
  with pytest.raises(KeyboardInterrupt):
    ablations.run_grid(tiny_config(), workdir, ROWS, SEEDS)
  assert calls == ['full/seed_1', 'nq1/seed_1']
  calls.clear()
  monkeypatch.setattr(trainer, 'train_and_evaluate', counting)
  summary = ablations.run_grid(tiny_config(), workdir, ROWS, SEEDS)
  assert calls == ['nq1/seed_1']    # full/seed_1 finished before the kill
  calls.clear()
  again = ablations.run_grid(tiny_config(), workdir, ROWS, SEEDS)
  assert calls == [] and again['rows'] == summary['rows']
  assert all(r['seeds_done'] == SEEDS for r in summary['rows'].values())

  changed = tiny_config()
  changed.train.num_steps = 4     # finished runs of another config are refused, not mixed in
  with pytest.raises(ValueError, match='train.num_steps: 2 -> 4'):
    ablations.run_grid(changed, workdir, ROWS, SEEDS)
  assert calls == []


def test_preempted_run_writes_no_result(cli_grid, tmp_path, monkeypatch):
  """train_and_evaluate returning before its last step (SIGTERM) is not a finished run."""
  _, finished = cli_grid
  config = ablations.row_config(tiny_config(), 'full', 0)
  config.data.data_dir = os.path.join(finished, 'data', 'seed_0', 'data', 'tfds')
  monkeypatch.setattr(trainer, 'train_and_evaluate', lambda c, w: {'mIoU': 0.5, 'oIoU': 0.5})
  with pytest.raises(ablations.RunIncompleteError, match='stopped at step 0 of 2'):
    ablations.train_run(config, str(tmp_path), 'full', 0)
  assert not os.path.exists(tmp_path / ablations.RESULT_FILE)


@pytest.mark.parametrize('rows,seeds,message', [
    (['full', 'nq3'], ['0'], 'unknown row(s) nq3'),
    (['full'], [], '--seeds is empty'),
    (['full'], ['0', 'x'], 'not a list of integers'),
    (['full'], ['1', '1'], 'distinct'),
])
def test_bad_input_is_one_error_line_before_training(rows, seeds, message, tmp_path, monkeypatch,
                                                     capsys):
  calls = []
  monkeypatch.setattr(trainer, 'train_and_evaluate', lambda *a: calls.append(a))
  with pytest.raises(SystemExit) as e:
    ablations.cli(tiny_config(), str(tmp_path / 'grid'), rows, seeds)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
  assert calls == [] and not os.path.exists(tmp_path / 'grid')


def test_rows_change_the_full_model_but_synthetic_already_drops_the_global_features():
  full = base.get_config()
  for name, (_, overrides) in ablations.ROWS.items():
    config = ablations.row_config(full, name, seed=3)
    assert config.seed == 3
    assert not ablations.unchanged_overrides(full, name)   # every row ablates the paper's model
    for dotted, value in overrides.items():
      section = config
      for part in dotted.split('.')[:-1]:
        section = section[part]
      assert section[dotted.split('.')[-1]] == value
  # configs/synthetic.py is the full model: every row ablates something of it; a config that
  # already lacks a part makes that row a repeat of full, and the command says so.
  assert ablations._no_op_rows(synthetic.get_config(), list(ablations.ROWS)) == []
  gates_off = synthetic.get_config()
  gates_off.model.neck.use_global_text = False
  assert ablations._no_op_rows(gates_off, list(ablations.ROWS)) == ['no_global_text']


def test_one_seed_has_no_std():
  assert ablations._mean_std([0.5]) == (0.5, None)
  mean, std = ablations._mean_std([1.0, 2.0, 3.0])
  assert (mean, std) == (2.0, 1.0)    # sample std, ddof=1
