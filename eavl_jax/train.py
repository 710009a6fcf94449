"""Trains EAVL.

  python -m eavl_jax.train --config=configs/refcoco.py --workdir=DIR [--config.optim.learning_rate=1e-4]

Restarting with the same workdir resumes from its latest checkpoint. Multi-host: see
eavl_jax/distributed.py and launch/ (docs/distributed.md).
"""
import os
import sys

# XLA:CPU takes each step's temporaries as one malloc block (200 MB for configs/synthetic.py);
# glibc serves a block over 32 MB with a fresh mmap and unmaps it on free, so every step faults it
# in again 4 KiB at a time (30% of the CPU time in the kernel; docs/performance.md §2.5). With
# transparent huge pages for malloc the faults are 512x fewer: 4.25 -> 4.87 steps/s there.
# glibc reads its tunables only at start-up, hence the re-exec. A GLIBC_TUNABLES already set
# (even empty) is left alone: the way to opt out.
MALLOC_TUNABLES = 'glibc.malloc.hugetlb=1'


def malloc_tunables_wanted(environ, glibc_version, thp_mode):
  """Whether to restart with MALLOC_TUNABLES: glibc >= 2.35 (the tunable's first release) and
  transparent huge pages not 'never'. glibc_version: e.g. 'glibc 2.36' or None (another libc)."""
  if 'GLIBC_TUNABLES' in environ or not glibc_version or thp_mode not in ('always', 'madvise'):
    return False
  major, minor = (int(x) for x in glibc_version.split()[-1].split('.')[:2])
  return (major, minor) >= (2, 35)


def host_facts():
  """(glibc version string or None, transparent-huge-page mode or None) of this machine."""
  try:
    glibc = os.confstr('CS_GNU_LIBC_VERSION')
  except (ValueError, OSError, AttributeError):
    glibc = None
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      thp = f.read().split('[')[1].split(']')[0]
  except (OSError, IndexError):
    thp = None
  return glibc, thp


def restart_with_malloc_tunables():
  """Replaces this process by one with MALLOC_TUNABLES when wanted; before the heavy imports, so
  that they run once."""
  if malloc_tunables_wanted(os.environ, *host_facts()):
    os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES))


if __name__ == '__main__':
  restart_with_malloc_tunables()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from eavl_jax import distributed
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs and metrics.')


def quiet_libraries():
  """INFO lines of orbax, grain, tfds, ... are dropped; ours and every warning stay."""
  ours = (os.sep + 'eavl_jax' + os.sep, os.sep + 'data_prep' + os.sep)
  noise = ('Requested `tracked_metric`',)   # orbax, on every save between two validations
  logging.get_absl_handler().addFilter(
      lambda r: (r.levelno >= logging.converter.STANDARD_WARNING
                 and not any(n in str(r.msg) for n in noise))
      or any(p in r.pathname for p in ours))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError('--config and --workdir are required')
  quiet_libraries()
  logging.info('GLIBC_TUNABLES=%s', os.environ.get('GLIBC_TUNABLES'))
  distributed.initialize()
  logging.info('process %d of %d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  from eavl_jax import trainer  # pylint: disable=g-import-not-at-top
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (trainer.NonFiniteLossError, ValueError, FileNotFoundError) as e:
    # Bad config / data / checkpoint: the message names the field, file or entries.
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  jax.config.config_with_absl()
  app.run(main)
