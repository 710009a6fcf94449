"""What every benchmark prints: the machine line and a median timer."""
import os
import platform
import time

import jax
import numpy as np


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def machine_line(torch_module=None) -> str:
  """CPU model / cores, load, JAX backend and versions (and torch's, with its thread count)."""
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  line = (f'machine: {cpu_model()}, {os.cpu_count()} cores (load avg {load:.1f}); '
          f'jax {jax.__version__} backend={jax.default_backend()} '
          f'({jax.devices()[0].device_kind}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r})')
  if torch_module is not None:
    line += (f'; torch {torch_module.__version__} threads={torch_module.get_num_threads()} '
             f'interop={torch_module.get_num_interop_threads()}')
  return line


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
  """Median wall time of fn() (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def interleaved_medians(fns, repeats: int, warmup: int = 2):
  """Median wall time of each fn, the fns called in turn within every repeat, so that a change of
  load on a shared machine hits all of them alike."""
  for _ in range(warmup):
    for fn in fns:
      fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, t in zip(fns, times):
      start = time.perf_counter()
      fn()
      t.append(time.perf_counter() - start)
  return [float(np.median(t)) for t in times]
