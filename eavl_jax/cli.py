"""The flags and log settings the command-line programs share (train, evaluate, predict,
model_info, convert, and the benchmark and tool scripts). Each program defines its flags only
when run as a program, so that importing it adds none."""
import difflib
import os
import runpy
import sys

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags


def define_config_flag(lock_config=True):
  """--config: a configs/*.py file; --config.a.b=v overrides a key (locked: a typo is refused)."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                  lock_config=lock_config)


def define_checkpoint_flags(workdir_help):
  """--workdir, --checkpoint, --best: which trained weights a program reads."""
  flags.DEFINE_string('workdir', None, workdir_help)
  flags.DEFINE_string('checkpoint', None, 'A step of --workdir, or a checkpoint folder '
                      '<workdir>/checkpoints/<step>. Default: the latest.')
  flags.DEFINE_bool('best', False, 'The checkpoint with the best validation mIoU.')


def drop_closed_loop_noise():
  """After a checkpoint read fails (checkpointing.DamagedCheckpointError), TensorStore's pending
  callbacks meet asyncio's closed event loop and each prints `RuntimeError: Event loop is closed`
  through sys.unraisablehook: dozens of tracebacks around the one error line. Those, and only
  those, are dropped; every other unraisable exception is printed as before."""
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'):
      previous(unraisable)
  sys.unraisablehook = hook


def quiet_libraries():
  """INFO lines of orbax, grain, tfds, ... are dropped; ours and every warning stay; and the
  closed-event-loop noise (drop_closed_loop_noise)."""
  drop_closed_loop_noise()
  ours = (os.sep + 'eavl_jax' + os.sep,)
  noise = ('Requested `tracked_metric`',)   # orbax, on every save between two validations
  logging.get_absl_handler().addFilter(
      lambda r: (r.levelno >= logging.converter.STANDARD_WARNING
                 and not any(n in str(r.msg) for n in noise))
      or any(p in r.pathname for p in ours))


def unknown_config_key(argv):
  """-> one line naming the first `--config.<path>=v` of `argv` whose path is not a key of the
  config file that `--config=` names, with the closest known keys; None when every path exists."""
  config_file = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if config_file is None:
    return None
  config = runpy.run_path(config_file.split(':')[0])['get_config']()
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    path = arg[len('--config.'):].split('=', 1)[0].split('.')
    node = config
    for depth, key in enumerate(path):
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      if key not in known:
        where = '.'.join(['config'] + path[:depth])
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hint = (f'did you mean {", ".join(close)}?' if close
                else f'its keys: {", ".join(sorted(known))}' if known
                else f'{where} is a value, not a group')
        return f'--config.{".".join(path)}: {where} has no key {key!r} ({hint})'
      node = node[key]
  return None


def parse_flags(argv):
  """absl's flag parsing, for `app.run(main, flags_parser=cli.parse_flags)`: a `--config.` override
  that names no key of the config is one `error:` line (exit 2) instead of ml_collections'
  traceback. Other flag errors go to absl as before (its usage message)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):
    message = unknown_config_key(argv)
    if message is None:
      raise
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(2)
