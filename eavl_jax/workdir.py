"""A run's workdir: where its checkpoints and evaluations go; before any slow work, the folders
it will write are checked writable and one run at a time holds it.

The lock is `<workdir>/.lock`, held with flock(2) for as long as the run: the operating system
drops it with the process, so a killed run leaves nothing behind to clean up. Only process 0 of a
multi-host job takes it.
"""
import errno
import fcntl
import os

LOCK_FILE = '.lock'


def checkpoint_dir(workdir) -> str:
  """<workdir>/checkpoints: Orbax's steps (eavl_jax/checkpointing.py)."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def eval_dir(workdir) -> str:
  """<workdir>/eval: the evaluation command's JSON files."""
  return os.path.join(os.path.abspath(workdir), 'eval')
_held = {}   # abspath of a workdir -> the open lock file of this process


class NotWritableError(ValueError):
  pass


def check_writable(*folders):
  """Creates each folder if needed and writes (then removes) a small file in it; NotWritableError naming
  the first folder where that fails. A probe rather than os.access: access() says yes for root on
  a read-only mount and knows nothing of a full disk."""
  for folder in folders:
    probe = os.path.join(folder, f'.write_test_{os.getpid()}')
    try:
      os.makedirs(folder, exist_ok=True)
      with open(probe, 'w') as f:
        f.write('ok')
      os.remove(probe)
    except OSError as e:
      raise NotWritableError(f'{folder}: cannot write there ({e.strerror or e}): the run saves '
                             'its checkpoints, logs and results under the workdir; choose a '
                             'writable --workdir or free the disk') from None


def claim(workdir):
  """Locks `workdir` for this process (again: no-op); ValueError when another run holds it."""
  workdir = os.path.abspath(workdir)
  if workdir in _held:
    return
  path = os.path.join(workdir, LOCK_FILE)
  f = open(path, 'a+')   # pylint: disable=consider-using-with  (held until release)
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    f.seek(0)
    holder = f.read().strip() or 'unknown'
    f.close()
    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
      raise
    raise ValueError(f'{workdir} is in use by another run ({holder}, {path}): two runs in one '
                     'workdir would overwrite each other\'s checkpoints and logs; wait for it, stop '
                     'it, or choose another --workdir') from None
  f.seek(0)
  f.truncate()
  f.write(f'pid {os.getpid()} on {os.uname().nodename}')
  f.flush()
  _held[workdir] = f


def release(workdir):
  """Drops this process's lock on `workdir` (if it holds one)."""
  f = _held.pop(os.path.abspath(workdir), None)
  if f is not None:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def prepare(workdir, main_process=True):
  """The training workdir: it and its checkpoints/ are writable, and (process 0) this run holds it."""
  workdir = os.path.abspath(workdir)
  check_writable(workdir)
  if main_process:
    claim(workdir)   # before anything is made in a workdir that another run holds
  check_writable(checkpoint_dir(workdir))
