"""The memory check before the first train step (eavl_jax/device_memory.py)."""
import json
import os
import subprocess
import sys
import types

import jax
import pytest

from configs import tiny
from eavl_jax import device_memory
from eavl_jax import optim
from eavl_jax import sharding as sharding_lib
from eavl_jax import steps
from eavl_jax import trainer
from eavl_jax import weights
from eavl_jax.models import builder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir):
  """The tiny model at 128² (the synthetic images' size) and global batch 8: its activations
  outweigh the gradient sum that accumulation adds, so accumulating shrinks the step."""
  c = tiny.get_config()
  c.model.image_size = 128
  c.data.data_dir = data_dir
  c.data.eval_max_size = 128
  c.train.global_batch_size = 8
  c.train.eval_every_steps = 0
  return c


def _needed(config, accum):
  config = device_memory.with_accum(config, accum)
  model = builder.build_model(weights.with_checkpoint_text_sizes(config.model))
  mesh = sharding_lib.make_mesh(config.mesh)
  compiled = steps.lower_train_step(config, model, mesh,
                                      optim.make_optimizer(config.optim, 8)).compile()
  return device_memory.step_bytes(compiled)['needed']


@pytest.fixture(scope='module')
def needs(synthetic_records):
  """Bytes per device of the step with 1, 2 and 4 accumulation steps, each compiled with the 8
  optimizer updates of the run below (the same programs: the persistent compilation cache of
  tests/conftest.py makes the trainer's compiles of them cheap)."""
  config = _config(synthetic_records)
  return {f: _needed(config, f) for f in (1, 2, 4)}


def test_a_step_too_big_stops_before_training_with_one_line(needs, synthetic_records, tmp_path):
  """Limit = what 4 accumulation steps need: 1 and 2 do not fit, the line names 4."""
  assert needs[1] > needs[2] > needs[4]      # what the setting above is for
  limit = needs[4]
  workdir = tmp_path / 'run'
  out = subprocess.run(
      [sys.executable, '-m', 'eavl_jax.train', '--config=configs/tiny.py', f'--workdir={workdir}',
       f'--config.data.data_dir={synthetic_records}', '--config.model.image_size=128',
       '--config.train.global_batch_size=8', '--config.train.num_steps=8',
       '--config.train.eval_every_steps=0', f'--config.train.device_memory_bytes={limit}'],
      cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
  assert out.returncode == 1, out.stderr[-3000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in out.stderr, out.stderr[-3000:]
  line = errors[0]
  assert f'needs {needs[1]} bytes' in line and f'has {limit} bytes' in line, line
  assert 'train.device_memory_bytes' in line, line
  assert '--config.optim.grad_accum_steps=4 (measured' in line, line
  for switch in ('more devices', '--config.model.remat=True', '--config.model.dtype=bfloat16'):
    assert switch in line, line
  searching = [l for l in out.stderr.splitlines() if 'searching the smallest' in l]
  assert len(searching) == 1 and 'at most 2 more compile(s)' in searching[0], out.stderr[-3000:]
  assert out.stderr.index('searching the smallest') < out.stderr.index('error:')
  # no checkpoint, no metrics: no step ran
  assert sorted(os.listdir(workdir)) == ['.lock', 'checkpoints', 'config.json']
  assert os.listdir(workdir / 'checkpoints') == []


def test_the_named_accumulation_fits_and_trains(needs, synthetic_records, tmp_path):
  config = _config(synthetic_records)
  config.optim.grad_accum_steps = 4
  config.train.num_steps = 4
  config.train.checkpoint_every_steps = 4
  config.train.log_every_steps = 1
  config.train.device_memory_bytes = needs[4]
  trainer.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    assert f.read().count('"train/loss"') == 4


def test_device_limit(monkeypatch):
  config = tiny.get_config()
  # XLA:CPU reports no bytes_limit: its devices share the host's physical memory.
  host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  limit, source = device_memory.device_limit(config)
  assert limit == host // len(jax.local_devices()) and 'CPU device' in source
  fakes = [types.SimpleNamespace(platform='gpu', device_kind='fake', memory_stats=lambda b=b: {
      'bytes_limit': b}) for b in (2**34, 2**33)]
  monkeypatch.setattr(jax, 'local_devices', lambda: fakes)
  assert device_memory.device_limit(config) == (2**33, "memory_stats()['bytes_limit'] of fake")
  config.train.device_memory_bytes = 123                   # the config's number wins
  assert device_memory.device_limit(config) == (123, 'train.device_memory_bytes')
  config.train.device_memory_bytes = -1
  with pytest.raises(ValueError, match='train.device_memory_bytes=-1'):
    device_memory.device_limit(config)


def test_accum_candidates_split_the_batch_evenly():
  config = tiny.get_config()
  config.train.global_batch_size = 32
  # 32 expressions over 4 devices: steps of 4, 8, 16 or 32 expressions (the config's 32 is f=1)
  assert device_memory.accum_candidates(config, 4) == [2, 4, 8]
  config.data.refs_per_image = 2    # ... and their images (step / 2) over the 4 devices too
  assert device_memory.accum_candidates(config, 4) == [2, 4]
  config.optim.grad_accum_steps = 2
  assert device_memory.accum_candidates(config, 4) == [4]


class _FakeLowered:
  """lower(config) for the search: bytes = 1000 + 6000 / grad_accum_steps; counts compiles."""

  def __init__(self, compiles):
    self.compiles = compiles

  def __call__(self, config):
    self.compiles.append(config.optim.grad_accum_steps)
    needed = 1000 + 6000 // config.optim.grad_accum_steps
    analysis = types.SimpleNamespace(argument_size_in_bytes=needed, output_size_in_bytes=0,
                                     temp_size_in_bytes=0, alias_size_in_bytes=0)
    return types.SimpleNamespace(compile=lambda: types.SimpleNamespace(
        memory_analysis=lambda: analysis))


@pytest.mark.parametrize('limit,want', [(4000, 2), (2500, 4), (1500, 16), (1100, 64),
                                        (1050, None)])
def test_search_names_the_smallest_fitting_factor(limit, want):
  config = tiny.get_config()
  config.train.global_batch_size = 64
  compiles = []
  fit, needed = device_memory.smallest_fitting_accum(
      config, _FakeLowered(compiles), limit, device_memory.accum_candidates(config, 1))
  assert fit == want
  # the smallest: every smaller factor compiled does not fit, and the one before fit was tried
  if want is not None:
    assert needed[want] <= limit and 1000 + 6000 // (want // 2) > limit
  assert len(compiles) <= 3 and len(set(compiles)) == len(compiles)   # 6 candidates: log2


def test_the_message_without_a_fitting_factor():
  config = tiny.get_config()
  config.model.remat = True
  need = {'argument': 3 * 2**30, 'output': 2**30, 'temp': 2**31, 'alias': 2**30,
          'needed': 5 * 2**30}
  line = device_memory.too_big_message(config, need, 2**32, 'train.device_memory_bytes', None,
                                       {4: 4.5 * 2**30}, 1)
  assert '\n' not in line
  assert f'needs {5 * 2**30} bytes (5.00 GiB)' in line and f'has {2**32} bytes (4.00 GiB' in line
  assert 'no optim.grad_accum_steps fits alone: at 4, 4.50 GiB' in line
  assert 'model.remat' not in line and '--config.model.dtype=bfloat16' in line   # remat is on


_PER_DEVICE = """
import json, jax
from configs import tiny
from eavl_jax import device_memory, optim, sharding, steps
from eavl_jax.models import builder
c = tiny.get_config()
c.train.global_batch_size = 8
model = builder.build_model(c.model)
out = {}
for name, data, fsdp, how in (('one', 1, 1, 'replicate'), ('data2', 2, 1, 'replicate'),
                              ('fsdp2', 1, 2, 'fsdp')):
  c.mesh.data, c.mesh.fsdp, c.mesh.param_sharding = data, fsdp, how
  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:data * fsdp])
  lowered = steps.lower_train_step(c, model, mesh, optim.make_optimizer(c.optim, 8))
  out[name] = device_memory.step_bytes(lowered.compile())
print(json.dumps(out))
"""


def test_the_bytes_are_per_device_of_the_sharded_step():
  """2 fake CPU devices: the state split by fsdp halves the argument bytes of each device; the
  batch split over `data` leaves each device fewer temporaries."""
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                  '--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _PER_DEVICE], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  one, data2, fsdp2 = got['one'], got['data2'], got['fsdp2']
  batch = 8 * (64 * 64 * 3 * 4 + 2 * 12 * 4 + 64 * 64)   # image f32, ids and attention i32, mask u8
  # replicated state: each device's arguments lose only half the batch
  assert 0 < one['argument'] - data2['argument'] < batch
  assert data2['temp'] < one['temp']                                 # half the batch each
  assert 0.45 < fsdp2['argument'] / one['argument'] < 0.6            # the state's halves
