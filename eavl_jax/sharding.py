"""The device mesh (axes `data` and `fsdp`) and where the batch, parameters and optimizer state live.

The batch is split over every device (`data` × `fsdp`). Parameters and optimizer state are either
replicated or, with `mesh.param_sharding = 'fsdp'`, split along the `fsdp` axis: each array on its
largest dimension that the axis size divides (big_vision's rule); arrays with no such dimension
stay replicated. With `fsdp = 1` (the default) both settings are plain data parallelism.
"""
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # the batch dimension is split over both axes
PARAM_SHARDINGS = ('replicate', 'fsdp')


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp) mesh over `devices` (default: all); `mesh.data = -1` takes what fsdp leaves."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  fsdp, data = mesh_config.fsdp, mesh_config.data
  if fsdp < 1 or n % fsdp:
    raise ValueError(f'mesh.fsdp={fsdp} must be >= 1 and divide the {n} devices')
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f'mesh.data={mesh_config.data} x mesh.fsdp={fsdp} != {n} devices')
  if mesh_config.param_sharding not in PARAM_SHARDINGS:
    raise ValueError(f'mesh.param_sharding={mesh_config.param_sharding!r}: must be one of '
                     f'{PARAM_SHARDINGS}')
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, fsdp), AXES, axis_types=auto, devices=devices)


def fsdp_spec(shape, fsdp_size) -> P:
  """Splits the largest dimension of `shape` that `fsdp_size` divides (ties: the last one)."""
  if fsdp_size == 1:
    return P()
  best = None
  for axis, size in enumerate(shape):
    if size % fsdp_size == 0 and (best is None or size >= shape[best]):
      best = axis
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = 'fsdp'
  return P(*spec)


def tree_shardings(abstract_tree, mesh, param_sharding):
  """NamedShardings for a tree of arrays / ShapeDtypeStructs (parameters or optimizer state)."""
  fsdp_size = mesh.shape['fsdp']

  def one(x):
    if param_sharding == 'fsdp':
      return NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp_size))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_tree)


def axes_size(mesh, axes) -> int:
  """The number of devices along `axes` of the mesh."""
  return int(np.prod([mesh.shape[a] for a in axes]))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(host_batch, mesh):
  """This process's part of the batch (numpy dict) -> global jax.Arrays sharded on the batch axis.

  Every process passes its own rows (global batch / process count); the global array is their
  concatenation in process order.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      host_batch)


def put_global(tree, shardings):
  """Host values (identical on every process) -> global arrays with the given shardings."""
  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, tree, shardings)
