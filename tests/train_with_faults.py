"""`python -m eavl_jax.train` with a fault at a known step, for tests/test_resume.py:

  python -m tests.train_with_faults --sigkill_during_step=4 --config=... --workdir=...
  python -m tests.train_with_faults --sigterm_during_step=3 --config=... --workdir=...
  python -m tests.train_with_faults --sigint_during_step=3 --config=... --workdir=...

The training loop holds no test code: this runner wraps two functions of the library, then runs
train.main. --sigkill_during_step=N: while step N runs (the steps before it logged), the process
waits for the checkpoint saves started so far and kills itself with SIGKILL, as a crash would (no
handler, no clean-up); step N is lost. --sigterm_during_step=N: a SIGTERM, the notice of a
preemption, arrives while step N runs, at a known step rather than at a racing moment;
--sigint_during_step=N: the same with SIGINT (Ctrl-C). --unwritable_checkpoints_from_step=N: while
step N runs, <workdir>/checkpoints is moved aside and replaced by a link to a folder this process
cannot write (the saves that follow fail, as on a full disk). --hung_save_at_step=N: waiting for
the save of step N never ends (a hung disk), and a SIGTERM arrives 2 s into the wait.
Both act at the trainer's per-step preemption check, which receives the step number.
"""
import os
import signal
import threading
import time

from absl import app
from absl import flags
import jax

from eavl_jax import checkpointing
from eavl_jax import cli
from eavl_jax import train
from eavl_jax import trainer

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer('sigkill_during_step', None, 'SIGKILL this process while this step runs.')
  flags.DEFINE_integer('sigterm_during_step', None, 'SIGTERM this process while this step runs.')
  flags.DEFINE_integer('sigint_during_step', None, 'SIGINT this process while this step runs.')
  flags.DEFINE_integer('unwritable_checkpoints_from_step', None,
                       'Make <workdir>/checkpoints unwritable while this step runs.')
  flags.DEFINE_string('unwritable_folder', '/sys/kernel', 'A folder this process cannot write.')
  flags.DEFINE_integer('hung_save_at_step', None,
                       'The wait for the save of this step hangs; SIGTERM 2 s into it.')


def hang_save(step_that_hangs):
  """Wraps checkpointing.wait_for_saves: the wait for `step_that_hangs` sleeps 10 minutes, and a
  timer sends this process SIGTERM after 2 s."""
  wait_for_saves = checkpointing.wait_for_saves

  def hung_wait_for_saves(manager, step):
    if step != step_that_hangs:
      return wait_for_saves(manager, step)
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    time.sleep(600)

  checkpointing.wait_for_saves = hung_wait_for_saves


def inject_faults(sigkill_step, sigterm_step, sigint_step=None, unwritable_step=None,
                  unwritable_folder=None):
  """Wraps checkpointing.make_manager (to find the run's manager) and the trainer's preemption
  check (called once per step with the step number) so that the faults happen there."""
  managers = []
  make_manager = checkpointing.make_manager
  reached = trainer._Preemption.reached  # pylint: disable=protected-access

  def recording_make_manager(*args, **kwargs):
    manager = make_manager(*args, **kwargs)
    managers.append(manager)
    return manager

  def reached_with_faults(preemption, step):
    if step == sigkill_step:
      managers[-1].wait_until_finished()   # the saves so far are on disk, as after a slow crash
      os.kill(os.getpid(), signal.SIGKILL)
    if step == sigterm_step:
      os.kill(os.getpid(), signal.SIGTERM)   # the trainer's handler runs before `reached` reads it
    if step == sigint_step:
      os.kill(os.getpid(), signal.SIGINT)
    if step == unwritable_step:
      managers[-1].wait_until_finished()
      folder = str(managers[-1].directory)
      os.rename(folder, folder + '.moved_aside')
      os.symlink(unwritable_folder, folder)
    return reached(preemption, step)

  checkpointing.make_manager = recording_make_manager
  trainer._Preemption.reached = reached_with_faults  # pylint: disable=protected-access


def main(argv):
  inject_faults(FLAGS.sigkill_during_step, FLAGS.sigterm_during_step, FLAGS.sigint_during_step,
                FLAGS.unwritable_checkpoints_from_step, FLAGS.unwritable_folder)
  if FLAGS.hung_save_at_step is not None:
    hang_save(FLAGS.hung_save_at_step)
  train.main(argv)


if __name__ == '__main__':
  train.define_flags()
  define_flags()
  jax.config.config_with_absl()
  app.run(main, flags_parser=cli.parse_flags)
