"""Exact resume after kill -9, the NaN stop, and restoring a checkpoint of another config, through
`python -m eavl_jax.train` on the synthetic fixture."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from configs import tiny
from eavl_jax import checkpointing
from eavl_jax import optim
from eavl_jax import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def train(workdir, data_dir, *overrides, kill_after=None):
  # Bit-exact runs need deterministic kernels: XLA:CPU's multi-threaded Eigen reductions may sum
  # in a different order from run to run (on GPU: --xla_gpu_deterministic_ops=true).
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1')
  env.pop(trainer.KILL_AFTER_STEP_ENV, None)
  if kill_after is not None:
    env[trainer.KILL_AFTER_STEP_ENV] = str(kill_after)
  args = [sys.executable, '-m', 'eavl_jax.train', '--config=configs/tiny.py',
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


def test_kill_9_and_restart_equals_uninterrupted_run(synthetic_records, tmp_path):
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  proc = train(straight, synthetic_records)
  assert proc.returncode == 0, proc.stderr[-3000:]

  proc = train(killed, synthetic_records, kill_after=3)   # SIGKILL right after step 3
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert checkpointing.make_manager(killed, read_only=True).all_steps() == [2]
  assert sorted(logged_losses(killed)) == [1, 2, 3]
  proc = train(killed, synthetic_records)
  assert proc.returncode == 0, proc.stderr[-3000:]

  want, got = logged_losses(straight), logged_losses(killed)
  assert sorted(want) == list(range(1, STEPS + 1))
  assert got == want   # exact: same data order, same RNG, same arithmetic
  a, b = saved_params(straight, STEPS), saved_params(killed, STEPS)
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


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
  proc = train(tiny_trained.workdir, synthetic_records, '--config.model.hidden_dim=48')
  assert proc.returncode != 0
  assert 'written by another config' in proc.stderr
  listed = [l for l in proc.stderr.splitlines() if 'shape differs: ' in l]
  assert listed and all(l.strip().startswith('shape differs: params/') for l in listed[:10])
  assert any('params/decoder/' in l and '(2, 16) vs config (2, 24)' in l for l in listed), listed
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]


def test_sigterm_saves_exits_cleanly_and_resumes(synthetic_records, tmp_path):
  """Preemption: SIGTERM mid-run -> checkpoint of the step reached, exit 0; a restart goes on."""
  workdir = str(tmp_path / 'preempted')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop(trainer.KILL_AFTER_STEP_ENV, None)
  args = [sys.executable, '-m', 'eavl_jax.train', '--config=configs/tiny.py',
          f'--workdir={workdir}', f'--config.data.data_dir={synthetic_records}',
          '--config.train.num_steps=100000', '--config.train.checkpoint_every_steps=100000',
          '--config.train.log_every_steps=1', '--config.train.eval_every_steps=0']
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 500
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(logged_losses(workdir)) >= 2:
      break
    time.sleep(0.5)
  assert proc.poll() is None, 'training ended before it could be preempted'
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  saved = checkpointing.make_manager(workdir, read_only=True).all_steps()
  assert len(saved) == 1 and saved[0] >= 2, saved   # only the preemption save
  step = saved[0]
  assert f'checkpoint of step {step} saved' in out
  assert max(logged_losses(workdir)) == step

  proc = train(workdir, synthetic_records, f'--config.train.num_steps={step + 2}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'from step {step} on' in proc.stderr
  assert sorted(logged_losses(workdir))[-3:] == [step, step + 1, step + 2]
