"""The run's sizes, computed once from the config; every rule about them lives here.

One optimizer update sees `train.global_batch_size` expressions, split into
`optim.grad_accum_steps` train steps of `micro_batch` expressions each (micro_batch /
`data.refs_per_image` images: the Swin runs once per image). Every count in `config.train`
(num_steps, log / eval / checkpoint intervals) is in train steps; the learning-rate schedule
counts updates (optax.MultiSteps updates once every grad_accum_steps train steps).
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RunSizes:
  micro_batch: int        # expressions per train step, over all devices
  images_per_step: int    # micro_batch / data.refs_per_image
  grad_accum_steps: int
  total_steps: int        # train steps
  total_updates: int      # optimizer updates = total_steps / grad_accum_steps


def _require(ok, key, value, why):
  if not ok:
    raise ValueError(f'{key}={value!r}: {why}')


def _check_updates(config, total_updates, source):
  _require(total_updates >= 1, 'train.global_batch_size', config.train.global_batch_size,
           f'{source} give no optimizer update')
  _require(config.optim.warmup_steps < total_updates, 'optim.warmup_steps',
           config.optim.warmup_steps, f'leaves no room in the {total_updates} updates of {source}')


def micro_batch(config):
  """Expressions per train step: train.global_batch_size / optim.grad_accum_steps."""
  return config.train.global_batch_size // config.optim.grad_accum_steps


def check(config):
  """The rules that need neither the data nor the devices (config_check.validate calls it)."""
  tr, accum, k = config.train, config.optim.grad_accum_steps, config.data.refs_per_image
  _require(accum >= 1, 'optim.grad_accum_steps', accum, 'must be >= 1')
  _require(tr.global_batch_size >= 1 and tr.global_batch_size % accum == 0,
           'train.global_batch_size', tr.global_batch_size,
           f'must be a positive multiple of optim.grad_accum_steps={accum}')
  if micro_batch(config) % k:
    raise ValueError(f'data.refs_per_image={k} does not divide the {micro_batch(config)} '
                     'expressions of a train step (train.global_batch_size / '
                     'optim.grad_accum_steps)')
  if tr.num_steps > 0:
    _require(tr.num_steps % accum == 0, 'train.num_steps', tr.num_steps,
             f'must be a multiple of optim.grad_accum_steps={accum}')
    _check_updates(config, tr.num_steps // accum, 'train.num_steps')
  else:
    _require(tr.num_epochs > 0, 'train.num_epochs', tr.num_epochs,
             'must be > 0 (or set train.num_steps > 0)')


def compute(config, num_train_examples) -> RunSizes:
  """-> the run's RunSizes; num_train_examples counts the train split (for train.num_epochs)."""
  check(config)
  tr, accum = config.train, config.optim.grad_accum_steps
  if tr.num_steps > 0:
    total_updates = tr.num_steps // accum
  else:
    total_updates = tr.num_epochs * num_train_examples // tr.global_batch_size
    _check_updates(config, total_updates, f'train.num_epochs={tr.num_epochs} over '
                   f'{num_train_examples} training examples')
  step = micro_batch(config)
  return RunSizes(micro_batch=step, images_per_step=step // config.data.refs_per_image,
                  grad_accum_steps=accum, total_steps=total_updates * accum,
                  total_updates=total_updates)


def uneven_split(micro_batch, refs_per_image, devices, processes):
  """Why a train step of `micro_batch` expressions does not split evenly over `devices` (the
  batch axes) and `processes`, or None when it does: its expressions and its images both must."""
  split = int(np.lcm(devices, processes))
  if micro_batch % refs_per_image:
    return f'data.refs_per_image={refs_per_image} does not divide its {micro_batch} expressions'
  if micro_batch % split:
    return f'its {micro_batch} expressions'
  if (micro_batch // refs_per_image) % split:
    return f'its {micro_batch // refs_per_image} images (data.refs_per_image={refs_per_image})'
  return None


def check_mesh(config, sizes, batch_devices, eval_devices, processes):
  """ValueError unless a train step's expressions and images split evenly over the
  `batch_devices` and the processes, and train.eval_batch_size over `eval_devices`."""
  why = uneven_split(sizes.micro_batch, config.data.refs_per_image, batch_devices, processes)
  if why:
    raise ValueError(f'a train step (train.global_batch_size / optim.grad_accum_steps = '
                     f'{sizes.micro_batch} expressions) must split evenly over the {processes} '
                     f'process(es) and the {batch_devices} devices of the batch axes: {why} '
                     'do not')
  n = config.train.eval_batch_size
  if config.train.eval_every_steps > 0 and (n % processes or n % eval_devices):
    raise ValueError(f'train.eval_batch_size={n} must be divisible by the {processes} '
                     f'process(es) and by the {eval_devices} devices it is split over')
