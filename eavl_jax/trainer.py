"""The training loop: restore or create the state, train, validate and checkpoint on the
config's intervals, resume exactly; SIGTERM or SIGINT saves and stops (`Preempted`).

The commands prepare the data first (eavl_jax/synthetic_task.py for the synthetic task); the
run's sizes come from eavl_jax/run_sizes.py, the step from eavl_jax/steps.py and what is printed
and written from eavl_jax/reporting.py.
"""
import os
import signal
import sys

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tqdm

from eavl_jax import checkpointing
from eavl_jax import config_check
from eavl_jax import device_memory
from eavl_jax import scoring
from eavl_jax import input_pipeline
from eavl_jax import metrics as metrics_lib
from eavl_jax import optim
from eavl_jax import reporting
from eavl_jax import run_sizes
from eavl_jax import sharding as sharding_lib
from eavl_jax import steps
from eavl_jax import train_state as train_state_lib
from eavl_jax import weights
from eavl_jax import workdir as workdir_lib
from eavl_jax.models import builder


class NonFiniteLossError(FloatingPointError):
  pass


# A run stopped by SIGTERM or SIGINT after its checkpoint was saved exits with this code (sysexits'
# EX_TEMPFAIL: run the same command again); launch/ requeues on it (docs/training.md).
EXIT_PREEMPTED = 75


class Preempted(Exception):
  """The loop stopped on a signal after saving `step` in `directory`; the same command resumes."""

  def __init__(self, signal_name, step, directory):
    super().__init__(f'{signal_name}: checkpoint of step {step} saved in {directory}; run the same '
                     'command again to resume from it')
    self.signal_name, self.step, self.directory = signal_name, step, directory


class Interrupted(KeyboardInterrupt):
  """A signal that stops the run at once, without saving: a second one, or one that arrives while
  the run waits for a save to be written (a hung disk must not hold the job)."""


class _Preemption:
  """SIGTERM or SIGINT (Ctrl-C) -> save and stop after the current step (single process). A second
  signal, or one while `waiting_for_save`, raises Interrupted at once. Multi-host: JAX's preemption
  sync point (SIGTERM)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None   # the name of the signal that asked to stop
    self.waiting_for_save = None   # the step whose save the run waits for
    self._previous = {}
    if jax.process_count() == 1:
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.waiting_for_save is not None:
      raise Interrupted(f'{name} while waiting for the checkpoint of step '
                        f'{self.waiting_for_save} to be written: stopped without it')
    if self.received is not None:
      raise Interrupted(f'a second signal ({name}): stopped before the current step was saved')
    self.received = name

  def wait_for_saves(self, manager, step):
    """checkpointing.wait_for_saves, which a signal interrupts."""
    self.waiting_for_save = step
    try:
      checkpointing.wait_for_saves(manager, step)
    finally:
      self.waiting_for_save = None

  def reached(self, step):
    if jax.process_count() > 1:
      try:
        reached = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # preemption service not running
        return False
      if reached:
        self.received = self.received or 'SIGTERM'
      return reached
    return self.received is not None

  def close(self):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


# ------------------------------------------------------------------ the loop


def _flush(pending, writer, bar):
  """Fetches the metrics of the steps run since the last flush; logs their mean; NaN check."""
  if not pending:
    return
  steps = [s for s, _ in pending]
  values = jax.device_get([m for _, m in pending])
  pending.clear()
  for step, m in zip(steps, values):
    bad = [k for k in ('loss', 'grad_norm') if not np.isfinite(m[k])]
    if not m['params_finite']:
      bad.append('the updated parameters')
    if bad:
      raise NonFiniteLossError(
          f'{" and ".join(bad)} not finite at step {step} (loss={float(m["loss"])}, '
          f'grad_norm={float(m["grad_norm"])}): training stopped; the checkpoints before this '
          f'step are kept')
  mean = {f'train/{k}': float(np.mean([m[k] for m in values])) for k in ('loss', 'grad_norm')}
  mean['train/lr'] = float(values[-1]['lr'])
  writer.scalars(steps[-1], mean)
  bar.set_postfix(loss=f'{mean["train/loss"]:.4f}', lr=f'{mean["train/lr"]:.2e}')


def _read_latest(config, manager, read):
  """-> (step, read(step)) for the latest step, or None without checkpoints. A step that cannot be
  read (checkpointing.DamagedCheckpointError, on any process) stops the run, or with
  `train.resume_past_damaged` is set aside (checkpointing.set_aside, logged) and the step before it
  tried."""
  while (step := manager.latest_step()) is not None:
    error = None
    try:
      value = read(step)
    except checkpointing.DamagedCheckpointError as e:
      error = e
    failed = error is not None
    if jax.process_count() > 1:   # all processes fall back, or none
      failed = bool(multihost_utils.process_allgather(np.int32(failed)).any())
    if not failed:
      return step, value
    if error is None:
      where = os.path.join(str(manager.directory), str(step))
      error = checkpointing.DamagedCheckpointError(
          f'the checkpoint {where} cannot be read by another process', where, 'another process')
    if not config.train.resume_past_damaged or len(manager.all_steps()) < 2:
      raise error
    if jax.process_index() == 0:
      moved = checkpointing.set_aside(manager, step)
      logging.warning('the checkpoint %s cannot be read (%s); train.resume_past_damaged: moved it '
                      'to %s, trying the step before it', error.where, error.reason, moved)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set aside the checkpoint of step {step}')
    manager.reload()
  return None


def restore_or_create(config, model, tx, mesh, manager, sizes):
  """-> (train state, train iterator): the latest checkpoint of `manager` with its data order, or
  a new state and a fresh iterator."""
  pc = jax.process_count()

  def loader(seed):
    return input_pipeline.make_train_loader(config, seed=seed, shard_index=jax.process_index(),
                                            shard_count=pc, batch_size=sizes.micro_batch // pc)

  train_iter = loader(config.seed)

  def restore(step):
    abstract, shardings = train_state_lib.abstract_train_state(config, model, tx, mesh)
    return checkpointing.restore(manager, step, abstract, shardings, train_iter)

  restored = _read_latest(config, manager, restore)
  if restored is None:
    state, _ = train_state_lib.create_train_state(config, model, tx, mesh)
    return state, train_iter
  latest, (state, same_data_order) = restored
  logging.info('resumed from %s at step %d', manager.directory, latest)
  if not same_data_order:
    # Documented fallback (docs/distributed.md): another process count cannot continue the
    # saved per-process iterators; a new shuffled pass starts, seeded by (seed, step).
    logging.warning('the checkpoint of step %d was written by %s processes, this job has %d: '
                    'the training data continue with a new shuffle (seed %d + step) instead of '
                    'the saved order', latest, checkpointing.saved_process_count(manager, latest),
                    pc, config.seed)
    train_iter = loader(config.seed + latest)
  return state, train_iter


def validate(config, predict, state, mesh, step, writer, bar, num_images=0):
  """Validation on data.val_split: scalars and prediction panels to the writer, the table
  printed; -> its metrics."""
  variables = state.variables()
  result, images = scoring.evaluate_split(
      config, lambda b: predict(variables, b), config.data.val_split, mesh=mesh,
      num_images=num_images)
  writer.scalars(step, {f'val/{k}': result[k] for k in
                        metrics_lib.METRIC_KEYS + metrics_lib.DIVERSITY_KEYS if k in result})
  writer.images(step, 'val/predictions', images)
  bar.write(reporting.format_table(config.data.val_split, step, result))
  warning = reporting.collapse_warning(config, config.data.val_split, step, result)
  if warning:
    logging.warning(warning)
    bar.write(warning)
  return result


def train_and_evaluate(config, workdir):
  """Trains (resuming from workdir's latest checkpoint), validates, checkpoints; returns the last
  validation metrics (or None with evaluation off). The data must be ready: the synthetic task's
  through synthetic_task.prepare (the train command calls it)."""
  workdir = os.path.abspath(workdir)
  config_check.validate(config, training=True)   # every key, before any slow work
  workdir_lib.prepare(workdir, main_process=jax.process_index() == 0)   # writable, ours alone
  try:
    return _train_and_evaluate(config, workdir)
  finally:
    workdir_lib.release(workdir)


def _train_and_evaluate(config, workdir):
  manager = checkpointing.make_manager(workdir, config.train)
  # Another model config is refused before the compile, config.json kept.
  _read_latest(config, manager, lambda step: checkpointing.check_model_of_step(
      manager, step, weights.with_checkpoint_text_sizes(config.model)))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = sharding_lib.make_mesh(config.mesh)
  sizes = run_sizes.compute(config, input_pipeline.num_examples(config, config.data.train_split))
  run_sizes.check_mesh(config, sizes, sharding_lib.axes_size(mesh, sharding_lib.BATCH_AXES),
                       sharding_lib.axes_size(mesh, ('data',)), jax.process_count())
  model = builder.build_model(weights.with_checkpoint_text_sizes(config.model))
  optimizer = optim.make_optimizer(config.optim, sizes.total_updates)   # (tx, schedule): once

  def lower(c):   # the run's step; device_memory's search asks for other grad_accum_steps
    opt = optimizer if c is config else optim.make_optimizer(c.optim, sizes.total_updates)
    return steps.lower_train_step(c, model, mesh, opt)

  # Compiled before any slow work, and held against each device's memory (one line if too big).
  train_step = device_memory.compile_train_step(config, lower, mesh.size)
  state, train_iter = restore_or_create(config, model, optimizer[0], mesh, manager, sizes)
  return train_loop(config, workdir, model, mesh, manager, state, train_iter, train_step, sizes)


def train_loop(config, workdir, model, mesh, manager, state, train_iter, train_step, sizes):
  """Steps from the state's step to the last one, validating and checkpointing on the config's
  intervals; on SIGTERM / SIGINT saves the current step and raises Preempted; closes the manager;
  -> the last validation metrics (None with evaluation off)."""
  tr = config.train
  total_steps = sizes.total_steps
  main = jax.process_index() == 0
  evaluating = tr.eval_every_steps > 0
  start = int(jax.device_get(state.step))
  base_rng = jnp.asarray(jax.device_get(state.rng))
  step_rng = jax.jit(jax.random.fold_in, out_shardings=sharding_lib.replicated(mesh))
  predict = steps.make_predict_fn(model)
  logging.info('training: %d steps (%d optimizer updates of %d examples) from step %d on %d '
               'device(s), mesh %s', total_steps, sizes.total_updates, tr.global_batch_size, start,
               jax.device_count(), dict(mesh.shape))
  writer = reporting.Writer(workdir)
  preemption = _Preemption()
  bar = tqdm.tqdm(total=total_steps, initial=start, disable=not main, desc='train',
                  dynamic_ncols=True, file=sys.stderr)
  pending, result, last_eval, shown = [], None, None, None   # shown: the step of the last table
  interrupted = False
  try:
    for step in range(start + 1, total_steps + 1):   # `step`: train steps done after this one
      host_batch = next(train_iter)
      batch = sharding_lib.global_batch({k: host_batch[k] for k in steps.TRAIN_KEYS}, mesh)
      state, metrics = train_step(state, batch, step_rng(base_rng, step - 1))
      pending.append((step, metrics))
      bar.update(1)
      last = step == total_steps
      preempted = preemption.reached(step)
      evaluate_now = evaluating and (step % tr.eval_every_steps == 0 or last)
      save_now = (step % tr.checkpoint_every_steps == 0 or last or evaluate_now or preempted)
      if step % tr.log_every_steps == 0 or save_now:
        _flush(pending, writer, bar)
      eval_metrics = None
      if evaluate_now:
        result = validate(config, predict, state, mesh, step, writer, bar, tr.num_eval_images)
        last_eval = shown = step
        eval_metrics = {checkpointing.BEST_METRIC: result[checkpointing.BEST_METRIC]}
      if save_now:
        checkpointing.save(manager, step, state, train_iter, metrics=eval_metrics)
      if preempted:
        preemption.wait_for_saves(manager, step)
        if jax.process_count() > 1:   # every process's part of the step is written
          multihost_utils.sync_global_devices(f'preempted at step {step}')
        raise Preempted(preemption.received, step, manager.directory)
    _flush(pending, writer, bar)
    bar.close()
    if evaluating and last_eval is None:   # resumed at the end: evaluate what is there
      variables = state.variables()
      result, _ = scoring.evaluate_split(config, lambda b: predict(variables, b),
                                            config.data.val_split, mesh=mesh)
      last_eval = start
    preemption.wait_for_saves(manager, total_steps)
  except Interrupted:   # the pending save is left unfinished (Orbax ignores it): no wait here
    interrupted = True
    raise
  finally:
    bar.close()   # before any error message: the bar's line ends here
    preemption.close()
    writer.close()
    if not interrupted:
      manager.close()   # waits for pending saves
  if main and result is not None and last_eval != shown:   # not already written by the loop
    print(reporting.format_table(config.data.val_split, last_eval, result), flush=True)
  return result
