"""The sharded train step on 8 fake CPU devices and on 2 processes x 4 devices equals 1 device.

The runs happen in fresh processes (tests/multidevice_worker.py) because the fake device count
(XLA_FLAGS) must be set before jax starts.
"""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'multidevice_worker.py')
TOL = 1e-5


def _env(devices):
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                    f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  env.pop('JAX_COORDINATOR_ADDRESS', None)
  return env


def _load(path):
  with np.load(path) as d:
    return {k: d[k] for k in d.files}


@pytest.fixture(scope='module')
def meshes(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('meshes') / 'meshes.npz')
  proc = subprocess.run([sys.executable, WORKER, 'meshes', out], env=_env(8), cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return _load(out)


def _params(results, prefix):
  return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}


def _assert_same_run(got, want, got_prefix, want_prefix, tol=TOL):
  np.testing.assert_allclose(got[got_prefix + 'losses'], want[want_prefix + 'losses'], atol=tol,
                             rtol=tol)
  got_params = _params(got, got_prefix + 'params/')
  want_params = _params(want, want_prefix + 'params/')
  assert sorted(got_params) == sorted(want_params) and want_params
  # The head's BatchNorm (layouts *_bn: head_norm='batch'): the running averages are those of the
  # global batch, whatever the mesh.
  got_stats = _params(got, got_prefix + 'batch_stats/')
  want_stats = _params(want, want_prefix + 'batch_stats/')
  assert sorted(got_stats) == sorted(want_stats)
  for name, value in want_stats.items():
    np.testing.assert_allclose(got_stats[name], value, atol=tol, rtol=10 * tol, err_msg=name)
  for name, value in want_params.items():
    # Sharding changes the order of the float32 sums (per-device partial gradients, then the
    # all-reduce), and two SGD steps at lr 1 carry that rounding into the parameters: compare
    # each tensor by its relative error in norm (1e-5), and every element loosely (1e-4), so that
    # one cancelling sum (seen: one entry of 4096 2e-5 apart, on a value of 0.11) does not fail a
    # correct reduction while a wrong one (a missing or doubled device share: O(1)) still does.
    got_value = got_params[name]
    error = np.linalg.norm(got_value - value) / max(np.linalg.norm(value), 1.0)
    assert error <= tol, f'{name}: relative error {error:.2e} > {tol}'
    np.testing.assert_allclose(got_value, value, atol=10 * tol, rtol=10 * tol, err_msg=name)


@pytest.mark.parametrize('layout', ['data8', 'data2_fsdp4'])
def test_sharded_step_equals_one_device(meshes, layout):
  _assert_same_run(meshes, meshes, f'{layout}/', 'one_device/')


def test_batch_norm_step_on_8_devices_equals_one_device(meshes):
  """model.head_norm='batch': statistics over the global batch, not over each device's share
  (which would differ by O(1): 1 sample per device). Dividing by the batch's variances magnifies
  the reordered float sums of the sharded step into the gradients (seen: 1.7e-4 relative on BERT's
  token-type embedding, whose gradient sums every token), hence a looser tolerance (1e-3) than the
  other layouts; statistics of one sample per device would be another function altogether."""
  assert _params(meshes, 'one_device_bn/batch_stats/')
  _assert_same_run(meshes, meshes, 'data8_bn/', 'one_device_bn/', tol=100 * TOL)


def _num_params(results):
  return sum(v.size for v in _params(results, 'one_device/params/').values())


def test_data_parallel_step_all_reduces_gradients_once(meshes):
  """One all-reduce per step carries every gradient (not a reduction per parameter or per
  accumulation), and nothing else is communicated."""
  sizes = meshes['data8/all-reduce']
  assert len(sizes) == 1, sizes
  # Every trained parameter's gradient, plus at most the loss scalars; BERT's pooler is unused by
  # EAVL, so its gradient is known to be zero and is not reduced.
  assert 0.99 * _num_params(meshes) <= sizes[0] <= _num_params(meshes) + 16
  assert len(meshes['data8/reduce-scatter']) == 0 and len(meshes['data8/all-gather']) == 0


def test_fsdp_step_gathers_params_and_reduce_scatters_gradients(meshes):
  """ZeRO-3: parameters all-gathered for the forward pass, gradients reduce-scattered once each;
  no all-reduce of activations (the compute stays split by the batch)."""
  n = _num_params(meshes)
  scattered = meshes['data2_fsdp4/reduce-scatter'].sum()
  reduced = meshes['data2_fsdp4/all-reduce'].sum()
  gathered = meshes['data2_fsdp4/all-gather'].sum()
  assert scattered + reduced <= 1.01 * n + 16, (scattered, reduced, n)
  assert gathered >= 0.5 * n, (gathered, n)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(meshes, tmp_path):
  address = f'localhost:{_free_port()}'
  outs = [str(tmp_path / f'p{i}.npz') for i in range(2)]
  # stderr to files, not pipes: a pipe read only after the other process ends can fill up (64 KiB
  # of XLA warnings on a loaded machine) and block its writer before the shutdown barrier.
  logs = [open(tmp_path / f'p{i}.log', 'w+') for i in range(2)]
  procs = [subprocess.Popen([sys.executable, WORKER, 'multiprocess', outs[i], address, '2', str(i)],
                            env=_env(4), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=logs[i],
                            text=True) for i in range(2)]
  for p, log in zip(procs, logs):
    p.wait(timeout=900)
    log.seek(0)
    assert p.returncode == 0, log.read()[-3000:]
    log.close()
  two = _load(outs[0])
  assert int(two['process_count']) == 2 and int(two['device_count']) == 8
  _assert_same_run(two, meshes, '', 'data8/')
