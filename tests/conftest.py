"""Session-wide fixtures shared by test files: a tiny synthetic data set, raw and built, and a
tiny model briefly trained on it.

Also a persistent XLA compilation cache for the session, this process and the entry points the
tests start: many tests compile the same tiny programs (init, train step) again, in subprocesses.
Set before jax is imported; the cache keys hold the program, the flags and the versions.

And LLVM at optimisation level 0 for the session and the processes it starts (XLA_FLAGS, appended
to): the tiny programs spend far more time compiling than running, and level 0 compiles them
about a quarter faster. XLA's HLO passes, which decide the operations, are unchanged.
"""
import os

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      '.pytest_cache', 'jax_compilation_cache')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# Also XLA:CPU's compile-time switches: fusions through the classic emitters, the fast-compile
# preset, and LLVM codegen in one piece (two test workers already fill the two cores). On the
# gradient test of four model settings, cold cache: 56 -> 35 s.
_FAST_COMPILE = ('--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false '
                 '--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE '
                 '--xla_cpu_parallel_codegen_split_count=1')
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
import types

import pytest

from eavl_jax.data import build
from eavl_jax.data import synthetic

# The files that take longest on a cold clean clone (`pytest --durations=45`), longest first:
# they start first, so that `-n 2 --dist loadfile` does not end with one worker alone on one of
# them (pytest.ini turns off xdist's own order, by number of tests per file).
SLOWEST_FILES = ('test_train_distributed.py', 'test_device_check.py', 'test_launch.py',
                 'test_lavt.py', 'test_device_memory.py', 'test_model.py', 'test_resume.py',
                 'test_ablations.py', 'test_optim.py', 'test_head.py', 'test_synthetic.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


NUM_IMAGES = 12
SEED = 0


@pytest.fixture(scope='session')
def synthetic_raw(tmp_path_factory):
  """Folder of a 12-image synthetic data set in the refer layout.

  refer_root = the folder, images = <folder>/images, dataset = 'synthetic'.
  """
  out = str(tmp_path_factory.mktemp('synthetic_raw'))
  synthetic.generate(out, NUM_IMAGES, SEED)
  return out


@pytest.fixture(scope='session')
def synthetic_records(synthetic_raw, tmp_path_factory):
  """TFDS data_dir holding eavl_refer/synthetic built from `synthetic_raw`: set
  `config.data.data_dir` to it (with config.data.dataset = 'synthetic', e.g. configs/tiny.py)."""
  data_dir = str(tmp_path_factory.mktemp('synthetic_records'))
  build.build('synthetic', synthetic_raw, os.path.join(synthetic_raw, 'images'), data_dir,
              log=lambda *a: None)
  return data_dir


TINY_TRAIN_STEPS = 2
TINY_EVAL_MAX_SIZE = 128  # the synthetic images are 128 x 128


@pytest.fixture(scope='session')
def tiny_trained(synthetic_records, tmp_path_factory):
  """configs/tiny.py trained TINY_TRAIN_STEPS steps on `synthetic_records` (one checkpoint, no
  validation). Fields: workdir, steps, eval_max_size, config() -> a fresh copy of its config."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from eavl_jax import trainer  # pylint: disable=g-import-not-at-top

  def config():
    c = tiny.get_config()
    c.data.data_dir = synthetic_records
    c.data.eval_max_size = TINY_EVAL_MAX_SIZE
    c.train.num_steps = TINY_TRAIN_STEPS
    c.train.checkpoint_every_steps = TINY_TRAIN_STEPS
    c.train.eval_every_steps = 0
    return c

  workdir = str(tmp_path_factory.mktemp('tiny_trained_run'))
  trainer.train_and_evaluate(config(), workdir)
  return types.SimpleNamespace(workdir=workdir, steps=TINY_TRAIN_STEPS,
                               eval_max_size=TINY_EVAL_MAX_SIZE, config=config)


@pytest.fixture
def unwritable_folder(tmp_path):
  """A folder this process cannot write into: one without write permission for a user; for root,
  who writes anywhere the permissions say no, /sys/kernel (sysfs refuses new files)."""
  if os.geteuid() == 0:
    return '/sys/kernel'
  folder = tmp_path / 'read_only'
  folder.mkdir()
  folder.chmod(0o555)
  return str(folder)
