"""Trains EAVL.

  python -m eavl_jax.train --config=configs/refcoco.py --workdir=DIR [--config.optim.learning_rate=1e-4]

Restarting with the same workdir resumes from its latest checkpoint. SIGTERM or Ctrl-C saves the
current step and exits with code 75 (trainer.EXIT_PREEMPTED); a finished run exits 0, a failed one 1. Multi-host: see
eavl_jax/distributed.py and launch/ (docs/distributed.md).
"""
import os
import sys

from eavl_jax import malloc

if __name__ == '__main__':
  malloc.restart_with_malloc_tunables()   # before the heavy imports, so that they run once

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax

from eavl_jax import cli
from eavl_jax import distributed
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  cli.define_config_flag()
  flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs and metrics.')


def run(config, workdir):
  """Checks the config, makes the synthetic task's data when it is the data set, trains; -> the
  last validation metrics (None with evaluation off)."""
  # pylint: disable=g-import-not-at-top  (loaded after the malloc restart, see main)
  from eavl_jax import config_check
  from eavl_jax import synthetic_task
  from eavl_jax import trainer
  from eavl_jax import workdir as workdir_lib
  config_check.validate(config, training=True)   # every key, before the data are generated
  workdir_lib.prepare(workdir, main_process=jax.process_index() == 0)   # writable, ours alone
  config = synthetic_task.prepare(config, os.path.abspath(workdir))
  return trainer.train_and_evaluate(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.config is None or FLAGS.workdir is None:
    raise app.UsageError('--config and --workdir are required')
  cli.quiet_libraries()
  logging.info('GLIBC_TUNABLES=%s', os.environ.get('GLIBC_TUNABLES'))
  distributed.initialize()
  logging.info('process %d of %d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  # After the malloc restart and jax.distributed: the model code loads once, in the final process.
  from eavl_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from eavl_jax import trainer  # pylint: disable=g-import-not-at-top
  try:
    run(FLAGS.config, FLAGS.workdir)
  except trainer.Preempted as e:
    logging.warning('preempted (%s): saved step %d to %s; exiting with %d', e.signal_name, e.step,
                    e.directory, trainer.EXIT_PREEMPTED)
    print(f'preempted ({e.signal_name}): checkpoint of step {e.step} saved in {e.directory}; '
          f'exit code {trainer.EXIT_PREEMPTED}: run the same command again to resume', flush=True)
    sys.exit(trainer.EXIT_PREEMPTED)
  except KeyboardInterrupt as e:   # before the loop, a second signal, or one during a save's wait
    what = str(e) if isinstance(e, trainer.Interrupted) else 'interrupted (Ctrl-C) before the loop'
    print(f'error: {what}; the checkpoints already in the workdir are kept', file=sys.stderr,
          flush=True)
    sys.stdout.flush()
    os._exit(130)   # not sys.exit: a save's background thread that hangs must not hold the exit
  except (trainer.NonFiniteLossError, checkpointing.SaveError, ValueError, FileNotFoundError) as e:
    # Bad config / data / checkpoint: the message names the field, file or entries.
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  define_flags()
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
