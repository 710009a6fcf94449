"""Before the first train step: the step compiled ahead of time and its memory held against the
devices'.

needed = arguments + outputs + temporaries - aliased bytes of XLA's `compiled.memory_analysis()`
(the state is donated: the new state reuses the old one's buffers). For a sharded step it is the
program of one device, so the bytes are per device. The limit per device is
`train.device_memory_bytes`, or with 0 the smallest `memory_stats()['bytes_limit']` of this
process's devices (GPU, TPU); on CPU, which reports none, the host's physical memory divided
by the number of CPU devices (they share it).

When the step does not fit, the gradient-accumulation factors that still split the batch evenly
are compiled too, to name the smallest one that fits. From factor 2 on, the bytes fall as the
micro-batch shrinks (activations) on top of a constant cost (optax.MultiSteps keeps a
parameter-sized gradient sum), so a binary search over the factors finds it with few compiles.
"""
import math
import os
import time

from absl import logging
import jax
import ml_collections

from eavl_jax import run_sizes

GIB = 2**30


class DeviceMemoryError(ValueError):
  """The train step needs more memory per device than the device has (a one-line message)."""


def step_bytes(compiled) -> dict:
  """XLA's memory analysis of a compiled step, per device: {'argument', 'output', 'temp', 'alias',
  'needed'} bytes; {} when the backend gives none."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  out = {k: int(getattr(analysis, f'{k}_size_in_bytes'))
         for k in ('argument', 'output', 'temp', 'alias')}
  out['needed'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def device_limit(config):
  """-> (bytes per device or None, where that number comes from)."""
  limit = config.train.device_memory_bytes
  if limit < 0:
    raise ValueError(f'train.device_memory_bytes={limit}: must be >= 0 (0: the device\'s own '
                     'limit)')
  if limit > 0:
    return int(limit), 'train.device_memory_bytes'
  devices = jax.local_devices()
  limits = [(d.memory_stats() or {}).get('bytes_limit') for d in devices]
  if not all(limits) and devices[0].platform == 'cpu':
    # XLA:CPU reports no limit; its devices share the host's memory.
    host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return host // len(devices), (f'the host\'s {readable_bytes(host)} of memory shared by '
                                  f'{len(devices)} CPU device(s)')
  if not all(limits):
    return None, f'{devices[0].platform} devices report no memory limit'
  return min(limits), f"memory_stats()['bytes_limit'] of {devices[0].device_kind}"


def accum_candidates(config, batch_devices):
  """grad_accum_steps above the config's whose train step still splits evenly over the batch
  devices and the processes (run_sizes' rule)."""
  n, k = config.train.global_batch_size, config.data.refs_per_image
  return [f for f in range(config.optim.grad_accum_steps + 1, n + 1)
          if n % f == 0 and run_sizes.uneven_split(n // f, k, batch_devices,
                                                   jax.process_count()) is None]


def with_accum(config, factor):
  config = ml_collections.ConfigDict(config.to_dict())
  config.optim.grad_accum_steps = factor
  return config


def smallest_fitting_accum(config, lower, limit, candidates):
  """Binary search over `candidates` (accum_candidates; compiled, not run) -> (factor that fits
  or None, {factor: needed bytes} of the factors compiled)."""
  needed, best = {}, None
  lo, hi = 0, len(candidates) - 1
  while lo <= hi:
    mid = (lo + hi) // 2
    factor = candidates[mid]
    needed[factor] = step_bytes(lower(with_accum(config, factor)).compile())['needed']
    logging.info('optim.grad_accum_steps=%d: the train step needs %s per device', factor,
                 readable_bytes(needed[factor]))
    if needed[factor] <= limit:
      best, hi = factor, mid - 1
    else:
      lo = mid + 1
  return best, needed


def readable_bytes(x):
  """Bytes for reading: GiB from 1 GiB, MiB below."""
  return f'{x / GIB:.2f} GiB' if x >= GIB else f'{x / 2**20:.1f} MiB'


def too_big_message(config, need, limit, source, fit, needed, batch_devices):
  """The one line of DeviceMemoryError: the bytes needed and there, and what would make it fit.

  fit: the smallest grad_accum_steps that fits, or None; needed: {factor: bytes} compiled."""
  m, size = config.model, readable_bytes
  line = (f'the train step needs {need["needed"]} bytes ({size(need["needed"])}) per device '
          f'(arguments {size(need["argument"])} + outputs {size(need["output"])} + temporaries '
          f'{size(need["temp"])} - donated {size(need["alias"])}: XLA\'s memory analysis of the '
          f'step compiled for train.global_batch_size={config.train.global_batch_size} / '
          f'optim.grad_accum_steps={config.optim.grad_accum_steps} on {batch_devices} '
          f'device(s)), the device has {limit} bytes ({size(limit)}, {source}). To fit: ')
  switches = ["more devices (the batch, and with mesh.param_sharding='fsdp' the state, are "
              'split over them)']
  if not m.remat:
    switches.append('--config.model.remat=True')
  if m.dtype != 'bfloat16':
    switches.append('--config.model.dtype=bfloat16')
  if fit is not None:
    steps = config.train.num_steps
    multiple = ', train.num_steps a multiple of it' if steps > 0 and steps % fit else ''
    return line + (f'--config.optim.grad_accum_steps={fit} (measured: {size(needed[fit])} per '
                   f'device{multiple}), or ' + ', '.join(switches))
  if needed:
    most = max(needed)
    return line + ', '.join(switches) + (
        f' (no optim.grad_accum_steps fits alone: at {most}, {size(needed[most])} per device; '
        'accumulation adds a parameter-sized gradient sum)')
  return line + ', '.join(switches) + (' (no larger optim.grad_accum_steps splits the batch '
                                       'evenly)')


def compile_train_step(config, lower, batch_devices):
  """The train step compiled ahead of time, its memory checked against the devices'.

  lower: config -> the jitted train step of that config lowered on its abstract state and batch
  (steps.lower_train_step); it is called again with other optim.grad_accum_steps when the step
  does not fit. batch_devices: the devices the batch is split over.
  Returns the compiled step (to run: no second compile); raises DeviceMemoryError.
  """
  limit, source = device_limit(config)
  start = time.perf_counter()
  compiled = lower(config).compile()
  need = step_bytes(compiled)
  logging.info('train step compiled in %.1f s; memory per device: %s; limit: %s (%s)',
               time.perf_counter() - start,
               ', '.join(f'{k} {readable_bytes(v)}' for k, v in need.items()) or 'no analysis',
               'none' if limit is None else readable_bytes(limit), source)
  if not need or limit is None or need['needed'] <= limit:
    return compiled
  candidates = accum_candidates(config, batch_devices)
  logging.warning(
      'the train step needs %s per device, the device has %s (%s): searching the smallest '
      'optim.grad_accum_steps that fits among %s, at most %d more compile(s) of about %.0f s '
      'each', readable_bytes(need['needed']), readable_bytes(limit), source, candidates,
      math.ceil(math.log2(len(candidates) + 1)), time.perf_counter() - start)
  fit, needed = smallest_fitting_accum(config, lower, limit, candidates)
  raise DeviceMemoryError(too_big_message(config, need, limit, source, fit, needed,
                                          batch_devices))
