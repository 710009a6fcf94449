"""Trains EAVL.

  python -m eavl_jax.train --config=configs/refcoco.py --workdir=DIR [--config.optim.learning_rate=1e-4]

Restarting with the same workdir resumes from its latest checkpoint. Multi-host: on TPU pods and
SLURM `jax.distributed.initialize()` finds its peers by itself (it is called when the environment
says so); elsewhere pass --coordinator_address, --num_processes and --process_id to every process.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs and metrics.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    "jax.distributed.initialize(): 'auto' when the environment is a multi-host job "
    '(SLURM with several tasks, a multi-host TPU, JAX_COORDINATOR_ADDRESS set) or the flags below '
    'are given.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (0 .. num_processes - 1).')


def multihost_environment() -> bool:
  env = os.environ
  return (int(env.get('SLURM_NTASKS', '1')) > 1 or 'JAX_COORDINATOR_ADDRESS' in env
          or len(env.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1
          or _COORDINATOR.value is not None)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or _WORKDIR.value is None:
    raise app.UsageError('--config and --workdir are required')
  if _DISTRIBUTED.value == 'on' or (_DISTRIBUTED.value == 'auto' and multihost_environment()):
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info('process %d of %d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  from eavl_jax import trainer  # pylint: disable=g-import-not-at-top
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except trainer.NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  jax.config.config_with_absl()
  app.run(main)
