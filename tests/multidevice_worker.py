"""Runs the tiny model's train step on several meshes; run by the tests in a fresh process, because
XLA_FLAGS (the fake CPU device count) must be set before jax is imported.

  python tests/multidevice_worker.py meshes OUT.npz          # 1 device, data=8, fsdp layouts
  python tests/multidevice_worker.py multiprocess OUT.npz ADDRESS NUM_PROCESSES PROCESS_ID

Every run starts from the same initial state (seeded) and trains NUM_STEPS steps on the same
seeded global batches with plain SGD at learning rate 1, so that the new parameters are the old minus
the gradient and comparing them compares the reduced gradients (Adam would turn the rounding noise of
gradients that are mathematically zero, such as attention key biases, into full +-lr steps); it writes the losses, gradient norms, final parameters and BatchNorm statistics (flattened) to
OUT.npz (process 0), plus, for `meshes`, the all-reduce / reduce-scatter sizes of the compiled
steps.
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
from jax._src import distributed  # pylint: disable=g-import-not-at-top
from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

from configs import tiny  # pylint: disable=g-import-not-at-top
from eavl_jax import optim  # pylint: disable=g-import-not-at-top
from eavl_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
from eavl_jax import train_state as train_state_lib  # pylint: disable=g-import-not-at-top
from eavl_jax import steps  # pylint: disable=g-import-not-at-top
from eavl_jax.models import builder  # pylint: disable=g-import-not-at-top

GLOBAL_BATCH = 8
NUM_STEPS = 2
# (name, mesh.data, mesh.fsdp, mesh.param_sharding, model.head_norm). The BatchNorm layouts train
# one step: at SGD lr 1 the second step's loss of that model is ~1e3, where float32 rounding alone
# is ~1e-4 of it.
LAYOUTS = (('one_device', 1, 1, 'replicate', 'none'), ('data8', 8, 1, 'replicate', 'none'),
           ('data2_fsdp4', 2, 4, 'fsdp', 'none'), ('one_device_bn', 1, 1, 'replicate', 'batch'),
           ('data8_bn', 8, 1, 'replicate', 'batch'))


def make_config(data=-1, fsdp=1, param_sharding='replicate', head_norm='none'):
  c = tiny.get_config()
  c.model.head_norm = head_norm
  c.train.global_batch_size = GLOBAL_BATCH
  c.mesh.data, c.mesh.fsdp, c.mesh.param_sharding = data, fsdp, param_sharding
  return c


def global_batches(config):
  """NUM_STEPS seeded batches of GLOBAL_BATCH examples (the train batch contract)."""
  rng = np.random.default_rng(0)
  s, l = config.model.image_size, config.model.max_tokens
  out = []
  for _ in range(NUM_STEPS):
    lengths = rng.integers(3, l + 1, GLOBAL_BATCH)
    mask = (np.arange(l)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(1000, 3000, (GLOBAL_BATCH, l)), 0).astype(np.int32)
    ids[:, 0] = 101
    yy, xx = np.mgrid[:s, :s]
    centre = rng.integers(8, s - 8, (GLOBAL_BATCH, 2))
    gt = ((yy[None] - centre[:, :1, None]) ** 2 + (xx[None] - centre[:, 1:, None]) ** 2 < 100)
    out.append({'image': rng.normal(size=(GLOBAL_BATCH, s, s, 3)).astype(np.float32),
                'input_ids': ids, 'attention_mask': mask, 'mask': gt.astype(np.uint8)})
  return out


def collective_sizes(hlo_text):
  """{op: [element counts]} of the all-reduce / reduce-scatter / all-gather ops of an HLO text."""
  sizes = {'all-reduce': [], 'reduce-scatter': [], 'all-gather': []}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?\S+ = (.+?) (all-reduce|reduce-scatter|all-gather)(?:-start)?\(',
                 line)
    if not m:
      continue
    shapes = re.findall(r'[a-z]+\d*\[([\d,]*)\]', m.group(1))
    sizes[m.group(2)].append(sum(int(np.prod([int(d) for d in s.split(',') if d]))
                                 for s in shapes))
  return sizes


def run(config, mesh, local_rows, num_steps=NUM_STEPS):
  """Trains num_steps steps; -> (losses, grad norms, flat final variables, compiled HLO text)."""
  model = builder.build_model(config.model)
  tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
  state, shardings = train_state_lib.create_train_state(config, model, tx, mesh)
  frozen = optim.frozen_mask(config.optim, state.params)
  step = steps.jit_train_step(steps.make_train_step(model, tx, schedule, config, frozen, mesh),
                                shardings, mesh)
  losses, norms, compiled = [], [], None
  for i, batch in enumerate(global_batches(config)[:num_steps]):
    local = {k: v[local_rows] for k, v in batch.items()}
    g = sharding_lib.global_batch(local, mesh)
    rng = jax.random.fold_in(state.rng, i)
    if compiled is None:
      compiled = step.lower(state, g, rng).compile()
      if jax.process_count() > 1:
        # The first cross-process collective sets up gloo, which waits 30 s for the other
        # process; on a loaded machine one process can finish compiling later than that. A
        # coordination-service barrier (no collective) lines them up first.
        distributed.global_state.client.wait_at_barrier('train step compiled', 600_000)
    state, metrics = compiled(state, g, rng)
    losses.append(float(metrics['loss']))
    norms.append(float(metrics['grad_norm']))
  variables = multihost_utils.process_allgather(
      {'params': state.params, 'batch_stats': state.batch_stats}, tiled=True)
  flat = {optim.path_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
  return np.asarray(losses), np.asarray(norms), flat, compiled.as_text()


def main(argv):
  mode, out = argv[1], argv[2]
  results = {}
  if mode == 'meshes':
    devices = jax.devices()
    for name, data, fsdp, param_sharding, head_norm in LAYOUTS:
      config = make_config(data, fsdp, param_sharding, head_norm)
      mesh = sharding_lib.make_mesh(config.mesh, devices[:data * fsdp])
      losses, norms, flat, hlo = run(config, mesh, slice(None),
                                     1 if head_norm == 'batch' else NUM_STEPS)
      results[f'{name}/losses'], results[f'{name}/grad_norms'] = losses, norms
      results.update({f'{name}/{k}': v for k, v in flat.items()})   # params/..., batch_stats/...
      for op, sizes in collective_sizes(hlo).items():
        results[f'{name}/{op}'] = np.asarray(sizes, np.int64)
  elif mode == 'multiprocess':
    address, num_processes, process_id = argv[3], int(argv[4]), int(argv[5])
    if num_processes > 1:
      jax.distributed.initialize(address, num_processes, process_id)
    config = make_config()
    mesh = sharding_lib.make_mesh(config.mesh)
    rows = GLOBAL_BATCH // jax.process_count()
    me = jax.process_index()
    losses, norms, flat, _ = run(config, mesh, slice(me * rows, (me + 1) * rows))
    results = {'losses': losses, 'grad_norms': norms, 'process_count': jax.process_count(),
               'device_count': jax.device_count(),
               **flat}
  else:
    raise ValueError(f'unknown mode {mode!r}')
  if jax.process_index() == 0:
    np.savez(out, **results)


if __name__ == '__main__':
  main(sys.argv)
