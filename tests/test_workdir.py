"""What a run reads and writes is checked before any slow work: a busy, read-only or half-writable
workdir, or a record file cut short, is one `error:` line from `python -m eavl_jax.train` before
anything is compiled; an evaluation whose results cannot be written is refused before it runs; the
lock goes with its process."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

from eavl_jax import evaluate
from eavl_jax import workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_refuses_a_bad_workdir_or_a_damaged_record_file_before_the_compile(synthetic_records, tmp_path,
                                                                       unwritable_folder):
  busy = tmp_path / 'busy'
  busy.mkdir()
  workdir.claim(str(busy))   # as another run would hold it
  half = tmp_path / 'half'   # the workdir writable, its checkpoints/ not
  half.mkdir()
  os.symlink(unwritable_folder, half / 'checkpoints')
  damaged = tmp_path / 'damaged_records'   # one train shard cut in half
  shutil.copytree(synthetic_records, damaged)
  [shard] = glob.glob(str(damaged / '*' / '*' / '*' / '*-train.array_record-*'))
  os.truncate(shard, os.path.getsize(shard) // 2)
  cases = {   # name: (workdir, data_dir, what the one error line says)
      'busy': (busy, synthetic_records, 'is in use by another run (pid '),
      'read-only': (os.path.join(unwritable_folder, 'run'), synthetic_records,
                    'run: cannot write there'),
      'checkpoints': (half, synthetic_records, 'checkpoints: cannot write there'),
      'damaged shard': (tmp_path / 'run', damaged,
                        f"split 'train': the record file {shard} cannot be read"),
  }
  try:
    procs = {name: subprocess.Popen(
        [sys.executable, '-m', 'eavl_jax.train', '--config=configs/tiny.py', f'--workdir={path}',
         f'--config.data.data_dir={data_dir}'],
        cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (path, data_dir, _) in cases.items()}
    for name, proc in procs.items():
      _, err = proc.communicate(timeout=300)
      errors = [line for line in err.splitlines() if line.startswith('error:')]
      assert proc.returncode == 1 and len(errors) == 1, (name, err[-2000:])
      assert cases[name][2] in errors[0], (name, errors[0])
      assert 'Traceback' not in err and 'train step compiled' not in err, (name, err[-2000:])
  finally:
    workdir.release(str(busy))
  assert sorted(os.listdir(busy)) == [workdir.LOCK_FILE]   # nothing written by the refused run


def test_a_lock_goes_with_its_process(tmp_path):
  """A run killed with SIGKILL leaves the lock file, not the lock: the next run takes it."""
  code = (f'import os, signal\nfrom eavl_jax import workdir\nworkdir.claim({str(tmp_path)!r})\n'
          'os.kill(os.getpid(), signal.SIGKILL)\n')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, timeout=120)
  assert proc.returncode == -9 and os.path.exists(tmp_path / workdir.LOCK_FILE)
  workdir.claim(str(tmp_path))
  workdir.claim(str(tmp_path))   # again in the same process: no-op
  workdir.release(str(tmp_path))


def test_evaluate_refuses_an_unwritable_eval_folder_before_evaluating(tiny_trained, tmp_path,
                                                                       unwritable_folder,
                                                                       monkeypatch):
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  os.symlink(unwritable_folder, run_dir / 'eval')
  step_dir = os.path.join(tiny_trained.workdir, 'checkpoints', str(tiny_trained.steps))
  evaluated = []
  monkeypatch.setattr(evaluate, 'evaluate_splits', lambda *a, **k: evaluated.append(a))
  with pytest.raises(workdir.NotWritableError, match='eval: cannot write there'):
    evaluate.run(tiny_trained.config(), str(run_dir), splits=['val'], checkpoint=step_dir)
  assert evaluated == []
