"""The flags and log settings the command-line programs share (train, evaluate, predict,
model_info, convert, and the benchmark and tool scripts). Each program defines its flags only
when run as a program, so that importing it adds none."""
import os

from absl import flags
from absl import logging
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


def quiet_libraries():
  """INFO lines of orbax, grain, tfds, ... are dropped; ours and every warning stay."""
  ours = (os.sep + 'eavl_jax' + os.sep, os.sep + 'data_prep' + os.sep)
  noise = ('Requested `tracked_metric`',)   # orbax, on every save between two validations
  logging.get_absl_handler().addFilter(
      lambda r: (r.levelno >= logging.converter.STANDARD_WARNING
                 and not any(n in str(r.msg) for n in noise))
      or any(p in r.pathname for p in ours))
