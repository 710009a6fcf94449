"""Exact resume after kill -9 and after SIGINT / SIGTERM (preemption, exit code 75), the NaN stop, and restoring a
checkpoint of another config, through `python -m eavl_jax.train` on the synthetic fixture."""
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from eavl_jax import checkpointing
from eavl_jax import optim
from eavl_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def train(workdir, data_dir, *overrides, sigkill_during=None, sigterm_during=None,
          sigint_during=None, unwritable_from=None, unwritable_folder=None, hung_save_at=None):
  """`python -m eavl_jax.train`, or tests/train_with_faults.py for a fault at a known step."""
  # Bit-exact runs need deterministic kernels: XLA:CPU's multi-threaded Eigen reductions may sum
  # in a different order from run to run (on GPU: --xla_gpu_deterministic_ops=true). Every run
  # here compiles the same programs, so all but the first hit the session's compilation cache.
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                       '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1')
  program = ['eavl_jax.train']
  faults = {'sigkill_during_step': sigkill_during, 'sigterm_during_step': sigterm_during,
            'sigint_during_step': sigint_during, 'unwritable_checkpoints_from_step': unwritable_from,
            'unwritable_folder': unwritable_folder, 'hung_save_at_step': hung_save_at}
  if any(value is not None for value in faults.values()):
    program = ['tests.train_with_faults']
    program += [f'--{name}={value}' for name, value in faults.items() if value is not None]
  args = [sys.executable, '-m', *program, '--config=configs/tiny.py',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          f'--config.train.num_steps={STEPS}', '--config.train.checkpoint_every_steps=2',
          '--config.train.log_every_steps=1', '--config.train.eval_every_steps=0',
          *overrides]
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def logged_losses(workdir):
  """{step: loss} from metrics.jsonl; a step logged twice (re-run after a restart) keeps the last."""
  losses = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'train/loss' in record:
        losses[record['step']] = record['train/loss']
  return losses


def saved_params(workdir, step):
  config = tiny.get_config()
  params, restored_step = checkpointing.restore_for_eval(config, workdir, step=step)
  assert restored_step == step
  return {optim.path_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope='module')
def uninterrupted(synthetic_records, tmp_path_factory):
  """The reference: STEPS steps in one go. -> (workdir, {step: loss}, {name: final parameter})."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  proc = train(workdir, synthetic_records)
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = logged_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return workdir, losses, saved_params(workdir, STEPS)


def assert_same_run(workdir, uninterrupted):
  """Losses of every step and the final parameters equal the uninterrupted run's, exactly."""
  _, want_losses, want_params = uninterrupted
  assert logged_losses(workdir) == want_losses   # same data order, same RNG, same arithmetic
  got_params = saved_params(workdir, STEPS)
  assert sorted(got_params) == sorted(want_params)
  for name, value in want_params.items():
    np.testing.assert_array_equal(got_params[name], value, err_msg=name)


def test_kill_9_and_restart_equals_uninterrupted_run(uninterrupted, synthetic_records, tmp_path):
  killed = str(tmp_path / 'killed')
  proc = train(killed, synthetic_records, sigkill_during=4)   # a crash in step 4: 3 are done
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert checkpointing.make_manager(killed, read_only=True).all_steps() == [2]
  assert sorted(logged_losses(killed)) == [1, 2, 3]
  proc = train(killed, synthetic_records)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'from step 2 on' in proc.stderr
  assert_same_run(killed, uninterrupted)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synthetic_records, tmp_path):
  workdir = str(tmp_path / 'nan')
  # Warmup from 0 keeps step 1 sane; then a learning rate this large makes the parameters
  # overflow, and training must stop before a bad state is saved.
  proc = train(workdir, synthetic_records, '--config.optim.learning_rate=1e38',
               '--config.optim.warmup_steps=2', '--config.train.checkpoint_every_steps=1')
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'not finite at step' in errors[0], proc.stderr[-2000:]
  bad_step = int(errors[0].split('not finite at step ')[1].split()[0])
  steps = checkpointing.make_manager(workdir, read_only=True).all_steps()
  assert bad_step >= 2 and max(steps) == bad_step - 1
  good = saved_params(workdir, bad_step - 1)
  assert all(np.isfinite(v).all() for v in good.values())


def test_restore_of_another_config_names_the_mismatched_entries(tiny_trained, synthetic_records):
  """Refused before the compile (read from the checkpoint's metadata), the workdir's config.json
  left as the run that wrote the checkpoint had it."""
  with open(os.path.join(tiny_trained.workdir, 'config.json')) as f:
    saved_config = f.read()
  proc = train(tiny_trained.workdir, synthetic_records, '--config.model.hidden_dim=48')
  assert proc.returncode == 1
  assert 'written by another config' in proc.stderr and 'train step compiled' not in proc.stderr
  with open(os.path.join(tiny_trained.workdir, 'config.json')) as f:
    assert f.read() == saved_config
  listed = [l for l in proc.stderr.splitlines() if 'shape differs: ' in l]
  assert listed and all(l.strip().startswith('shape differs: params/') for l in listed[:10])
  assert any('params/decoder/' in l and '(2, 16) vs config (2, 24)' in l for l in listed), listed
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]


def test_sigint_and_sigterm_save_exit_75_and_resume(uninterrupted, synthetic_records, tmp_path):
  """Ctrl-C during step 3 (off the every-2-steps schedule) -> that step is saved and the process
  exits with trainer.EXIT_PREEMPTED (75); the restart gets SIGTERM during step 5, the same; the
  next restart ends with exit 0, as the uninterrupted run."""
  workdir = str(tmp_path / 'preempted')
  proc = train(workdir, synthetic_records, sigint_during=3)
  assert proc.returncode == trainer.EXIT_PREEMPTED, proc.stderr[-3000:]
  assert checkpointing.make_manager(workdir, read_only=True).all_steps() == [2, 3]
  assert 'preempted (SIGINT): checkpoint of step 3 saved' in proc.stdout
  assert 'Traceback' not in proc.stderr and 'KeyboardInterrupt' not in proc.stderr
  assert sorted(logged_losses(workdir)) == [1, 2, 3]   # stopped there, not at the end

  proc = train(workdir, synthetic_records, sigterm_during=5)
  assert proc.returncode == trainer.EXIT_PREEMPTED, proc.stderr[-3000:]
  assert 'from step 3 on' in proc.stderr
  assert 'preempted (SIGTERM): checkpoint of step 5 saved' in proc.stdout
  assert max(checkpointing.make_manager(workdir, read_only=True).all_steps()) == 5

  proc = train(workdir, synthetic_records)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'from step 5 on' in proc.stderr
  assert_same_run(workdir, uninterrupted)


def test_a_save_that_fails_stops_the_run_at_once_with_one_line(synthetic_records, tmp_path,
                                                             unwritable_folder):
  """checkpoints/ becomes unwritable during step 3 (a full disk, a lost mount): the save of step 4
  stops the run with one line naming the step, the folder and the steps on disk, instead of Orbax's
  background thread failing and the others waiting 5 minutes for it."""
  workdir = str(tmp_path / 'run')
  proc = train(workdir, synthetic_records, unwritable_from=3, unwritable_folder=unwritable_folder)
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
  assert errors[0].startswith(f'error: saving the checkpoint of step 4 in {workdir}/checkpoints '
                              'failed'), errors[0]
  assert 'Steps on disk: [2]' in errors[0] and 'Traceback' not in proc.stderr
  assert sorted(logged_losses(workdir)) == [1, 2, 3, 4]   # stopped at the failed save
  assert os.listdir(os.path.join(workdir, 'checkpoints.moved_aside')) == ['2']


def test_a_signal_ends_a_run_that_waits_on_a_hung_save(synthetic_records, tmp_path):
  """SIGTERM in step 3 asks for a save; its write hangs (a stuck disk), and a second SIGTERM 2 s
  into the wait ends the run at once: exit 130, one line naming the step, earlier steps kept."""
  workdir = str(tmp_path / 'run')
  proc = train(workdir, synthetic_records, sigterm_during=3, hung_save_at=3)
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert proc.returncode == 130 and len(errors) == 1, proc.stderr[-3000:]
  assert errors[0] == ('error: SIGTERM while waiting for the checkpoint of step 3 to be written: '
                       'stopped without it; the checkpoints already in the workdir are kept'), errors[0]
  assert 'Traceback' not in proc.stderr
  assert 2 in checkpointing.make_manager(workdir, read_only=True).all_steps()


def copy_with_damaged_latest(source, workdir):
  """Copies the run `source` to `workdir` and cuts the largest file of its latest step to a tenth;
  -> (steps, the latest step's folder)."""
  shutil.copytree(source, workdir)
  steps = checkpointing.make_manager(workdir, read_only=True).all_steps()
  latest = os.path.join(workdir, 'checkpoints', str(max(steps)))
  files = glob.glob(os.path.join(latest, 'state', '**', '*'), recursive=True)
  largest = max((f for f in files if os.path.isfile(f)), key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 10)
  return steps, latest


def test_resume_past_damaged_sets_the_step_aside_and_resumes_from_the_one_before(
    uninterrupted, synthetic_records, tmp_path):
  """train.resume_past_damaged: the damaged latest step is renamed <step>.damaged (kept, logged)
  and training resumes from the step before it and runs to the end."""
  workdir = str(tmp_path / 'run')
  steps, latest = copy_with_damaged_latest(uninterrupted[0], workdir)
  previous = sorted(steps)[-2]
  proc = train(workdir, synthetic_records, f'--config.train.num_steps={STEPS + 2}',
               '--config.train.resume_past_damaged=True')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (f'the checkpoint {latest} cannot be read' in proc.stderr
          and f'train.resume_past_damaged: moved it to {latest}.damaged' in proc.stderr), proc.stderr[-3000:]
  assert f'from step {previous} on' in proc.stderr
  assert os.listdir(os.path.join(latest + '.damaged', 'state'))        # kept, not deleted
  assert max(checkpointing.make_manager(workdir, read_only=True).all_steps()) == STEPS + 2


def test_a_damaged_step_is_named_with_the_steps_to_fall_back_to(uninterrupted, synthetic_records,
                                                                tmp_path):
  """A file of the latest step cut short (the disk, a copy gone wrong): resuming and evaluating
  name the step folder, the other steps and the way out; nothing is deleted, and the step before
  it still restores."""
  workdir = str(tmp_path / 'run')
  steps, latest = copy_with_damaged_latest(uninterrupted[0], workdir)
  evaluating = subprocess.Popen(
      [sys.executable, '-m', 'eavl_jax.evaluate', '--config=configs/tiny.py', f'--workdir={workdir}',
       f'--config.data.data_dir={synthetic_records}', '--splits=val'],
      cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  resuming = train(workdir, synthetic_records, f'--config.train.num_steps={STEPS + 2}')
  _, evaluate_err = evaluating.communicate(timeout=300)
  previous = sorted(steps)[-2]
  for proc, err in ((resuming, resuming.stderr), (evaluating, evaluate_err)):
    errors = [l for l in err.splitlines() if l.startswith('error:')]
    assert proc.returncode == 1 and len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f'error: the checkpoint {latest} cannot be read'), errors[0]
    assert f'Other steps there: {sorted(steps)[:-1]}' in errors[0], errors[0]
    assert '--checkpoint=<step>' in errors[0] and f'(e.g. to {max(steps)}.damaged)' in errors[0]
    assert 'Event loop is closed' not in err, err[-3000:]   # TensorStore's noise dropped
  assert checkpointing.make_manager(workdir, read_only=True).all_steps() == steps
  config = tiny.get_config()
  config.data.data_dir = synthetic_records
  _, step = checkpointing.restore_for_eval(config, workdir, step=previous)
  assert step == previous
