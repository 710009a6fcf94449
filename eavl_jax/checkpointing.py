"""Orbax checkpoints of training: `<workdir>/checkpoints/<step>/{state, data_iter}`.

'state' is the whole TrainState (step, params, optimizer state, RNG) as a nested dict of arrays;
'data_iter' is every process's input-iterator state (grain's orbax handler: one JSON file per
process). Saves are asynchronous. Kept: the last `train.keep_checkpoints` plus the one with the best
validation mIoU.
"""
import json
import os
import re

from flax import serialization
import grain.checkpoint as grain_checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from eavl_jax import train_state
from eavl_jax import weights
from eavl_jax import workdir as workdir_lib

STATE, DATA_ITER = 'state', 'data_iter'
BEST_METRIC = 'mIoU'
MAX_LISTED = 20  # mismatched entries named in an error


def make_manager(workdir, train_config=None, *, read_only=False) -> ocp.CheckpointManager:
  """Async manager keeping the last `keep_checkpoints` and the best by validation mIoU."""
  keep = train_config.keep_checkpoints if train_config is not None else None
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(n=keep),
      checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                                keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=not read_only, preservation_policy=policy,
      best_fn=lambda m: m[BEST_METRIC], best_mode='max', read_only=read_only, create=not read_only)
  handlers = {STATE: ocp.PyTreeCheckpointHandler(),
              DATA_ITER: grain_checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(workdir_lib.checkpoint_dir(workdir), item_handlers=handlers, options=options)


class _IteratorState:
  """What grain's handler saves / restores: the iterator state captured at the save's step.

  The state is taken when the save starts (the live iterator moves on while the write runs).
  """

  def __init__(self, state=None):
    self.state = state

  def get_state(self) -> bytes:
    s = self.state
    if isinstance(s, bytes):
      return s
    return json.dumps(s).encode()

  def set_state(self, state):
    self.state = state

  def start_prefetch(self):  # called by grain's handler after set_state
    pass


class SaveError(OSError):
  """A checkpoint could not be written (a full disk, a folder gone read-only): the run stops."""


def _save_failed(manager, step, error):
  intact = sorted(manager.all_steps())
  return SaveError(f'saving the checkpoint of step {step} in {manager.directory} failed '
                   f'({type(error).__name__}: {error}); training stopped. Steps on disk: '
                   f'{intact or "none"}; free the disk or fix the folder, then run the same '
                   'command again to resume from the latest')


def save(manager, step, state, data_iter, metrics=None):
  """Starts an asynchronous save of `state` and `data_iter.get_state()` at `step`; SaveError if
  it, or the save before it, failed."""
  args = ocp.args.Composite(**{
      STATE: ocp.args.PyTreeSave(serialization.to_state_dict(state)),
      DATA_ITER: grain_checkpoint.CheckpointSave(_IteratorState(data_iter.get_state())),
  })
  try:
    manager.check_for_errors()   # the previous (background) save
    # Orbax creates the step's folder in a background thread, and its other threads then wait 5
    # minutes for it: an unwritable folder is found here, at once.
    workdir_lib.check_writable(str(manager.directory))
    manager.save(step, args=args, metrics=metrics, force=True)
  except Exception as e:  # pylint: disable=broad-exception-caught  (orbax raises many kinds)
    raise _save_failed(manager, step, e) from e


def wait_for_saves(manager, step):
  """Blocks until the saves started are written; SaveError (naming `step`, the last save
  started) if one failed."""
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _save_failed(manager, step, e) from e


def _flat_shapes(tree):
  """{'params/decoder/...': shape} of a nested dict of arrays / metadata."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
    flat[name] = tuple(getattr(leaf, 'shape', np.shape(leaf)))
  return flat


def check_compatible(saved_tree, expected_tree, where):
  """Raises ValueError naming the entries whose presence or shape differ between the trees."""
  saved, expected = _flat_shapes(saved_tree), _flat_shapes(expected_tree)
  params_first = lambda flat: dict(sorted(flat.items(), key=lambda kv: kv[0].split('/')[0] != 'params'))
  saved, expected = params_first(saved), params_first(expected)
  problems = [f'  missing in checkpoint: {k} {expected[k]}' for k in expected if k not in saved]
  problems += [f'  not in this config: {k} {saved[k]}' for k in saved if k not in expected]
  problems += [f'  shape differs: {k} checkpoint {saved[k]} vs config {expected[k]}'
               for k in expected if k in saved and saved[k] != expected[k]]
  if problems:
    more = len(problems) - MAX_LISTED
    listed = problems[:MAX_LISTED] + ([f'  ... and {more} more'] if more > 0 else [])
    raise ValueError(f'the checkpoint at {where} was written by another config '
                     f'({len(problems)} mismatched entries):\n' + '\n'.join(listed))


class DamagedCheckpointError(ValueError):
  """A finalised step that cannot be read: disk trouble or a copy gone wrong (Orbax writes a step
  into a temporary folder and renames it when complete). `where`: its folder; `reason`: why."""

  def __init__(self, message, where, reason):
    super().__init__(message)
    self.where, self.reason = where, reason


def _damaged(manager, step, error):
  where = os.path.join(str(manager.directory), str(step))
  others = sorted(s for s in manager.all_steps() if s != step)
  way_out = (f': evaluate or predict one with --checkpoint=<step>, or move this folder aside '
             f'(e.g. to {step}.damaged) and training resumes from {others[-1]} '
             '(--config.train.resume_past_damaged=True does that itself)' if others else
             ', none to fall back to')
  text = str(error).strip()
  reason = (text.splitlines()[0].split(' See full TensorStore details')[0][:200] if text
            else type(error).__name__)
  array = re.findall(r"'path': '([^'/][^']*)/'", text)   # TensorStore's spec names the array
  reason += f' (array {array[-1]})' if array else ''
  return DamagedCheckpointError(
      f'the checkpoint {where} cannot be read: {reason}. A complete step that fails to read '
      'means disk trouble or a copy gone wrong; nothing was deleted. Other steps there: '
      f'{others or "none"}{way_out}.', where, reason)


def set_aside(manager, step):
  """Renames the folder of `step` to `<step>.damaged` (`.damaged-2`, ... if taken), which Orbax
  does not list as a step; -> the new path. Nothing is deleted."""
  where = os.path.join(str(manager.directory), str(step))
  moved, n = f'{where}.damaged', 1
  while os.path.exists(moved):
    n += 1
    moved = f'{where}.damaged-{n}'
  os.rename(where, moved)
  return moved


def _read(manager, step, read):
  """read() (an Orbax call on `step`, after the config checks) -> its value; any failure ->
  DamagedCheckpointError."""
  try:
    return read()
  except Exception as e:  # pylint: disable=broad-exception-caught  (TensorStore, zstd, ...)
    raise _damaged(manager, step, e) from None


def _saved_state_metadata(manager, step):
  metadata = _read(manager, step, lambda: manager.item_metadata(step)[STATE])
  return getattr(metadata, 'tree', metadata)


def _restore_targets(abstract_tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def saved_process_count(manager, step):
  """How many processes wrote the iterator states of `step` (grain: process_<i>-of-<n>.json)."""
  names = os.listdir(os.path.join(str(manager.directory), str(step), DATA_ITER))
  counts = {int(n.split('-of-')[1].split('.')[0]) for n in names if n.startswith('process_')}
  return counts.pop() if len(counts) == 1 else None


def restore(manager, step, abstract_state, state_shardings, data_iter):
  """Restores the TrainState of `step` (with the given shardings) and sets `data_iter`'s state.

  Returns (state, iterator_restored). The iterator state is per process: it is restored only when
  the checkpoint was written by as many processes as run now; otherwise `data_iter` is left as it
  is (the caller decides where the data continue).
  """
  where = os.path.join(str(manager.directory), str(step))
  target = serialization.to_state_dict(_restore_targets(abstract_state, state_shardings))
  check_compatible(_saved_state_metadata(manager, step), target, where)
  items = {STATE: ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target))}
  same_processes = saved_process_count(manager, step) == jax.process_count()
  if same_processes:
    items[DATA_ITER] = grain_checkpoint.CheckpointRestore(_IteratorState())
  restored = _read(manager, step, lambda: manager.restore(step, args=ocp.args.Composite(**items)))
  if same_processes:
    data_iter.set_state(restored[DATA_ITER].state)
  return serialization.from_state_dict(abstract_state, restored[STATE]), same_processes


def select_step(manager, step=None, best=False) -> int:
  """The latest step, the best by validation mIoU, or `step`; clear errors when absent."""
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}')
  if best:
    best_step = manager.best_step()
    if best_step is None or manager.metadata(best_step).metrics is None:
      raise ValueError(f'no checkpoint in {manager.directory} has a validation {BEST_METRIC}')
    return best_step
  if step is None:
    return manager.latest_step()
  if step not in steps:
    raise ValueError(f'no checkpoint of step {step} in {manager.directory}; '
                     f'steps there: {sorted(steps)}')
  return step


def parse_checkpoint(workdir, checkpoint):
  """A --checkpoint flag (None, a step of `workdir`, or a folder <other workdir>/checkpoints/<step>)
  -> (the workdir holding it, step or None)."""
  if checkpoint is None:
    return workdir, None
  if checkpoint.isdigit():
    return workdir, int(checkpoint)
  path = os.path.abspath(checkpoint.rstrip('/'))
  parent, name = os.path.split(path)
  if not name.isdigit() or os.path.basename(parent) != 'checkpoints':
    raise ValueError(f'--checkpoint={checkpoint!r}: expected a step number or a folder '
                     '<workdir>/checkpoints/<step>')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--checkpoint={checkpoint!r}: no such checkpoint folder')
  return os.path.dirname(parent), int(name)


def restore_variables(config, workdir, checkpoint=None, best=False):
  """-> (variables {'params', 'batch_stats'}, step) of the checkpoint that the --checkpoint /
  --best flags name (parse_checkpoint; default the latest); clear errors: none there, another
  config, both flags."""
  if best and checkpoint is not None:
    raise ValueError('give either --checkpoint or --best, not both')
  ckpt_workdir, step = parse_checkpoint(workdir, checkpoint)
  return restore_for_eval(config, ckpt_workdir, step=step, best=best)


def check_model_of_step(manager, step, model_config):
  """ValueError naming the entries when the model of `model_config` has other parameters than the
  checkpoint of `step` (read from its metadata: no array is loaded, nothing is compiled);
  -> the model's abstract variables ({'params'[, 'batch_stats']})."""
  abstract = train_state.abstract_variables(model_config)
  if not abstract['batch_stats']:
    del abstract['batch_stats']     # nothing to read (and checkpoints before BatchNorm lack it)
  where = os.path.join(str(manager.directory), str(step))
  saved = _saved_state_metadata(manager, step)
  if not isinstance(saved, dict) or 'params' not in saved:
    raise ValueError(f'{where} holds no training state with params')
  check_compatible({k: saved.get(k, {}) for k in abstract}, abstract, where)
  return abstract


def restore_for_eval(config, workdir, step=None, best=False):
  """-> (variables, step): the model's variables ({'params', 'batch_stats'}) of a training run's
  checkpoint, replicated on all devices. Default: the latest step; `best=True`: the best validation
  mIoU; or a given step. Raises FileNotFoundError for a workdir without checkpoints and ValueError
  (naming the mismatched entries) for a checkpoint of another model config.
  """
  manager = make_manager(workdir, read_only=True)
  step = select_step(manager, step, best)
  abstract = check_model_of_step(manager, step, weights.with_checkpoint_text_sizes(config.model))
  replicated = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(jax.devices()), ('data',)), jax.sharding.PartitionSpec())
  target = _restore_targets(abstract, jax.tree.map(lambda _: replicated, abstract))
  restored = _read(manager, step, lambda: manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target),
                                    partial_restore=True)})))
  manager.close()
  return {'params': restored[STATE]['params'],
          'batch_stats': restored[STATE].get('batch_stats', {})}, step
