"""Multi-host start-up shared by the entry points: flags and `jax.distributed.initialize()`.

On Cloud TPU pods and under SLURM, `initialize()` finds the coordinator, process count and id by
itself; on other clusters (or several processes on one machine, launch/local.sh) pass
--coordinator_address, --num_processes and --process_id to every process.
"""
import os

from absl import flags
import jax

DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    "jax.distributed.initialize(): 'auto' when the environment is a multi-host job "
    '(SLURM with several tasks, a multi-host TPU, JAX_COORDINATOR_ADDRESS set) or '
    '--coordinator_address is given.')
COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (0 .. num_processes - 1).')
LOCAL_DEVICE_IDS = flags.DEFINE_list(
    'local_device_ids', None,
    "This process's accelerators, e.g. 0,1,2,3,4,5,6,7. JAX's SLURM detection gives each process "
    'only the GPU of its SLURM_LOCALID: a process per node driving 8 GPUs must list them.')


def multihost_environment() -> bool:
  env = os.environ
  return (int(env.get('SLURM_NTASKS', '1')) > 1 or 'JAX_COORDINATOR_ADDRESS' in env
          or len(env.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1
          or COORDINATOR.value is not None)


def initialize():
  """Calls jax.distributed.initialize() when --distributed says so (default: when multi-host)."""
  if DISTRIBUTED.value == 'on' or (DISTRIBUTED.value == 'auto' and multihost_environment()):
    local_ids = [int(i) for i in LOCAL_DEVICE_IDS.value] if LOCAL_DEVICE_IDS.value else None
    jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value,
                               local_device_ids=local_ids)
