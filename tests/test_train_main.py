"""The entry point's host set-up: glibc malloc tunables for XLA:CPU's per-step temporaries."""
import json
import os
import subprocess
import sys

import pytest

from eavl_jax import malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('environ,glibc,thp,wanted', [
    ({}, 'glibc 2.36', 'madvise', True),
    ({}, 'glibc 2.35', 'always', True),
    ({}, 'glibc 2.34', 'madvise', False),         # the tunable does not exist yet
    ({}, 'glibc 2.36', 'never', False),           # no transparent huge pages
    ({}, None, 'madvise', False),                 # not glibc (musl, macOS)
    ({}, 'glibc 2.36', None, False),              # no THP interface (not Linux)
    ({'GLIBC_TUNABLES': ''}, 'glibc 2.36', 'madvise', False),   # the user's choice, or done
])
def test_malloc_tunables_wanted(environ, glibc, thp, wanted):
  assert malloc.malloc_tunables_wanted(environ, glibc, thp) is wanted


def test_entry_point_restarts_with_the_tunables(tmp_path):
  """`python -m eavl_jax.train` logs the tunables it runs under: set by its re-exec where this
  machine supports them, left alone (here: unset) where the caller chose."""
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  args = [sys.executable, '-m', 'eavl_jax.train', '--config=configs/tiny.py',
          f'--workdir={tmp_path}', f'--config.data.data_dir={tmp_path}/no_such_data',
          '--config.train.num_steps=1']
  out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  expected = (malloc.MALLOC_TUNABLES
              if malloc.malloc_tunables_wanted(env, *malloc.host_facts()) else 'None')
  assert f'GLIBC_TUNABLES={expected}' in out.stderr, out.stderr[-2000:]

  env['GLIBC_TUNABLES'] = 'glibc.malloc.check=0'
  out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert 'GLIBC_TUNABLES=glibc.malloc.check=0' in out.stderr, out.stderr[-2000:]


def test_synthetic_data_of_another_config_is_not_reused(tmp_path):
  from configs import tiny   # pylint: disable=g-import-not-at-top
  from eavl_jax import synthetic_task   # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  (tmp_path / 'data').mkdir()
  built = tmp_path / 'data' / 'BUILT'
  built.write_text(json.dumps({'synthetic_images': config.data.synthetic_images + 1,
                               'seed': config.seed}))
  with pytest.raises(ValueError, match='synthetic_images'):
    synthetic_task.prepare(config, str(tmp_path))
  built.write_text(json.dumps({'synthetic_images': config.data.synthetic_images,
                               'seed': config.seed}))   # records built before image_ids
  with pytest.raises(ValueError, match='image_ids'):
    synthetic_task.prepare(config, str(tmp_path))
  built.write_text(json.dumps({'synthetic_images': config.data.synthetic_images,
                               'seed': config.seed, 'metadata': 'image_ids'}))
  prepared = synthetic_task.prepare(config, str(tmp_path))     # the same config: reused as it is
  assert prepared.data.data_dir == str(tmp_path / 'data' / 'tfds')


def test_training_with_k_refs_per_image_runs_end_to_end(synthetic_records, tmp_path, capfd):
  """data.refs_per_image=2 through train_and_evaluate: loader, sharded step, checkpoint, eval;
  the last validation table is printed once."""
  from configs import tiny   # pylint: disable=g-import-not-at-top
  from eavl_jax import checkpointing   # pylint: disable=g-import-not-at-top
  from eavl_jax import trainer   # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.data_dir = synthetic_records
  config.data.refs_per_image = 2
  config.data.eval_max_size = 128
  config.train.num_steps = 2
  config.train.log_every_steps = 1
  config.train.eval_every_steps = 2
  config.train.checkpoint_every_steps = 2
  capfd.readouterr()
  result = trainer.train_and_evaluate(config, str(tmp_path))
  tables = capfd.readouterr().out.count('validation on val (')
  assert tables == 1, f'the validation table of step 2 printed {tables} times'
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  assert len(losses) == 2 and all(0 < x < 10 for x in losses)
  assert 0 <= result['mIoU'] <= 100
  _, step = checkpointing.restore_for_eval(config, str(tmp_path))
  assert step == 2
  # Started again at the end: no step to run; it evaluates what is there and prints that once.
  again = trainer.train_and_evaluate(config, str(tmp_path))
  out = capfd.readouterr().out
  assert out.count('validation on val (') == 1 and 'step 2)' in out
  assert again['mIoU'] == result['mIoU']
  config.train.global_batch_size = 3   # not a multiple of refs_per_image: one clear error
  with pytest.raises(ValueError, match='refs_per_image=2 does not divide the 3 expressions'):
    trainer.train_and_evaluate(config, str(tmp_path / 'bad'))
