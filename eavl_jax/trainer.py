"""The training loop: sharded train step, periodic validation, Orbax checkpoints, exact resume.

Every count in `config.train` (num_steps, log / eval / checkpoint intervals) is in train steps.
One train step processes global_batch_size / grad_accum_steps examples; the optimizer updates the
parameters once every grad_accum_steps train steps (optax.MultiSteps), so one update always sees
global_batch_size examples.
"""
import json
import os
import signal
import sys

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from data_prep import build
from data_prep import synthetic
from eavl_jax import checkpointing
from eavl_jax import config_check
from eavl_jax import device_memory
from eavl_jax import evaluation
from eavl_jax import input_pipeline
from eavl_jax import metrics as metrics_lib
from eavl_jax import optim
from eavl_jax import sharding as sharding_lib
from eavl_jax import steps
from eavl_jax import synthetic_pretrain
from eavl_jax import train_state as train_state_lib
from eavl_jax import weights
from eavl_jax.models import eavl


class NonFiniteLossError(FloatingPointError):
  pass


# ------------------------------------------------------------------ the step (eavl_jax/steps.py)

TRAIN_KEYS = steps.TRAIN_KEYS
make_train_step = steps.make_train_step
jit_train_step = steps.jit_train_step
lower_train_step = steps.lower_train_step
make_predict_fn = steps.make_predict_fn


# ------------------------------------------------------------------ sizes


def step_counts(config, num_train_examples):
  """-> (examples per train step, total train steps, total optimizer updates)."""
  tr, accum = config.train, config.optim.grad_accum_steps
  if tr.global_batch_size % accum:
    raise ValueError(f'train.global_batch_size={tr.global_batch_size} is not divisible by '
                     f'optim.grad_accum_steps={accum}')
  micro_batch = tr.global_batch_size // accum
  if tr.num_steps > 0:
    if tr.num_steps % accum:
      raise ValueError(f'train.num_steps={tr.num_steps} is not a multiple of '
                       f'optim.grad_accum_steps={accum}')
    total_updates = tr.num_steps // accum
  else:
    total_updates = tr.num_epochs * num_train_examples // tr.global_batch_size
  if total_updates < 1:
    raise ValueError(f'{num_train_examples} training examples, train.num_epochs={tr.num_epochs} '
                     f'and global_batch_size={tr.global_batch_size} give no optimizer step')
  return micro_batch, total_updates * accum, total_updates


def check_batch_split(name, batch_size, mesh, axes):
  """The batch must split evenly over processes and over the devices of `axes`."""
  devices = int(np.prod([mesh.shape[a] for a in axes]))
  if batch_size % jax.process_count() or batch_size % devices:
    raise ValueError(f'{name}={batch_size} must be divisible by the {jax.process_count()} '
                     f'process(es) and by the {devices} devices it is split over')


# ------------------------------------------------------------------ data


def prepare_data(config, workdir):
  """Synthetic data set with no data_dir: generate and build it under <workdir>/data once (and
  pretrain the vision encoder on it with pretrain.vision_steps > 0)."""
  if config.pretrain.vision_steps > 0 and (config.data.dataset != 'synthetic'
                                           or config.data.data_dir):
    raise ValueError(f'pretrain.vision_steps={config.pretrain.vision_steps} pretrains on the '
                     'synthetic data this command generates: it needs data.dataset=\'synthetic\' '
                     'and data.data_dir=\'\' (set it to 0 otherwise)')
  if config.data.dataset != 'synthetic' or config.data.data_dir:
    return config
  root = os.path.join(workdir, 'data')
  data_dir = os.path.join(root, 'tfds')
  done = os.path.join(root, 'BUILT')   # holds what was generated: a changed config must not reuse it
  wanted = {'synthetic_images': config.data.synthetic_images, 'seed': config.seed,
            'metadata': 'image_ids'}   # records built before image_ids was kept differ
  if jax.process_index() == 0 and not os.path.exists(done):
    n = config.data.synthetic_images
    logging.info('generating %d synthetic images into %s', n, root)
    counts = synthetic.generate(os.path.join(root, 'raw'), n, config.seed)
    logging.info('synthetic refs per split: %s', counts)
    build.build('synthetic', os.path.join(root, 'raw'), os.path.join(root, 'raw', 'images'),
                data_dir, log=logging.info)
    with open(done, 'w') as f:
      json.dump(wanted, f)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('synthetic data built')
  with open(done) as f:
    text = f.read()
  built = json.loads(text) if text.strip() else wanted   # an empty BUILT: written before this check
  if built != wanted:
    raise ValueError(f'{root} holds the synthetic data of {built}; this config asks for {wanted} '
                     '(data.synthetic_images, seed): use another --workdir, or delete that folder '
                     'to generate it again')
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.data_dir = data_dir
  if config.pretrain.vision_steps > 0:
    config.model.vision_encoder.pretrained = prepare_pretrained_vision(config, root)
  return config


def prepare_pretrained_vision(config, root):
  """config.pretrain.vision_steps > 0: the Swin pretrained on the synthetic train images under
  <root>/pretrained_vision (made once per pretraining config) -> that folder."""
  folder = os.path.join(root, 'pretrained_vision')
  done = os.path.join(folder, 'DONE')
  wanted = {'pretrain': config.pretrain.to_dict(), 'seed': config.seed,
            'vision_encoder': {k: v for k, v in config.model.vision_encoder.to_dict().items()
                               if k != 'pretrained'}, 'image_size': config.model.image_size}
  wanted = json.loads(json.dumps(wanted))     # tuples as lists, as read back
  if jax.process_index() == 0 and not os.path.exists(done):
    loss = synthetic_pretrain.pretrain(config, os.path.join(root, 'raw'), folder)
    with open(done, 'w') as f:
      json.dump({**wanted, 'final_loss': loss}, f)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('vision encoder pretrained')
  with open(done) as f:
    made = json.load(f)
  made.pop('final_loss', None)
  if made != wanted:
    raise ValueError(f'{folder} holds a vision encoder pretrained with {made}; this config asks '
                     f'for {wanted}: use another --workdir, or delete that folder')
  return folder


# ------------------------------------------------------------------ evaluation


def multi_query_head(model_config):
  """True when the head draws N_q > 1 masks (qIoU and S-ent then say something)."""
  m = model_config
  if m.name == 'lavt' and m.lavt.head != 'aligner':
    return False
  return m.num_queries > 1 and m.aligner.mode == 'aligner'


def collapse_warning(config, split, step, result):
  """One line when the queries draw nearly the same mask (qIoU >= eval.collapse_qiou), else None."""
  qiou = result.get('query_mask_iou')
  if qiou is None or not multi_query_head(config.model) or qiou < config.eval.collapse_qiou:
    return None
  return (f'warning: the {config.model.num_queries} queries have collapsed on {split} at step '
          f'{step}: qIoU {100 * qiou:.2f}% >= eval.collapse_qiou={100 * config.eval.collapse_qiou:g}% '
          f'(S-ent {100 * result["score_entropy"]:.2f}%), so they draw nearly one mask and the '
          'aligner works as a single kernel (table III\'s fixed row); what it means and what to '
          'try: docs/training.md, "When the queries collapse"')


def format_table(split, step, result):
  """METRIC_KEYS' columns, then qIoU (query_mask_iou) and S-ent (score_entropy); '-': absent."""
  keys = metrics_lib.METRIC_KEYS + metrics_lib.DIVERSITY_KEYS
  names = metrics_lib.METRIC_KEYS + ('qIoU', 'S-ent')
  head = ' '.join(f'{k:>7}' for k in names)
  row = ' '.join(f'{100 * result[k]:7.2f}' if k in result else f'{"-":>7}' for k in keys)
  return (f'validation on {split} ({result["samples"]} expressions, step {step}), in %:\n'
          f'{head}\n{row}')


# ------------------------------------------------------------------ logging


class Writer:
  """TensorBoard (workdir/tb) and workdir/metrics.jsonl, on process 0 only."""

  def __init__(self, workdir):
    self._active = jax.process_index() == 0
    if self._active:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (process 0 only; loads protobuf)
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tb'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def scalars(self, step, values):
    if not self._active:
      return
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self._jsonl.flush()

  def images(self, step, name, images):
    if self._active and images is not None:
      self._tb.add_images(name, images, step, dataformats='NHWC')

  def close(self):
    if self._active:
      self._tb.close()
      self._jsonl.close()


class _Preemption:
  """SIGTERM -> stop at the next step (single process); multi-host: JAX's preemption sync point."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step):
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # preemption service not running
        return False
    return self.requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


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


def check_train_batches(config, mesh, micro_batch):
  """ValueError unless a train step's expressions and images, and the eval batch, split evenly
  over the mesh's batch axes."""
  check_batch_split('train.global_batch_size / optim.grad_accum_steps', micro_batch, mesh,
                    sharding_lib.BATCH_AXES)
  k = config.data.refs_per_image
  if k > 1:   # the images of a step (micro_batch / K) are split like the expressions
    if micro_batch % k:
      raise ValueError(f'data.refs_per_image={k} does not divide the {micro_batch} expressions '
                       f'of a train step (train.global_batch_size / optim.grad_accum_steps)')
    check_batch_split(f'the images of a train step (train.global_batch_size / '
                      f'optim.grad_accum_steps / data.refs_per_image={k})', micro_batch // k,
                      mesh, sharding_lib.BATCH_AXES)
  if config.train.eval_every_steps > 0:
    check_batch_split('train.eval_batch_size', config.train.eval_batch_size, mesh, ('data',))


def restore_or_create(config, model, tx, mesh, manager, micro_batch):
  """-> (train state, train iterator): the latest checkpoint of `manager` with its data order, or
  a new state and a fresh iterator."""
  pc = jax.process_count()

  def loader(seed):
    return input_pipeline.make_train_loader(config, seed=seed, shard_index=jax.process_index(),
                                            shard_count=pc, batch_size=micro_batch // pc)

  train_iter = loader(config.seed)
  latest = manager.latest_step()
  if latest is None:
    state, _ = train_state_lib.create_train_state(config, model, tx, mesh)
    return state, train_iter
  abstract, shardings = train_state_lib.abstract_train_state(config, model, tx, mesh)
  state, same_data_order = checkpointing.restore(manager, latest, abstract, shardings, train_iter)
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
  result, images = evaluation.evaluate_split(
      config, lambda b: predict(variables, b), config.data.val_split, mesh=mesh,
      num_images=num_images)
  writer.scalars(step, {f'val/{k}': result[k] for k in
                        metrics_lib.METRIC_KEYS + metrics_lib.DIVERSITY_KEYS if k in result})
  writer.images(step, 'val/predictions', images)
  bar.write(format_table(config.data.val_split, step, result))
  warning = collapse_warning(config, config.data.val_split, step, result)
  if warning:
    logging.warning(warning)
    bar.write(warning)
  return result


def train_and_evaluate(config, workdir):
  """Trains (resuming from workdir's latest checkpoint), validates, checkpoints; returns the last
  validation metrics (or None with evaluation off)."""
  workdir = os.path.abspath(workdir)
  config_check.validate(config, training=True)   # every key, before any slow work
  os.makedirs(workdir, exist_ok=True)
  config = prepare_data(config, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = sharding_lib.make_mesh(config.mesh)
  micro_batch, total_steps, total_updates = step_counts(
      config, input_pipeline.num_examples(config, config.data.train_split))
  check_train_batches(config, mesh, micro_batch)
  model = eavl.build_model(weights.with_checkpoint_text_sizes(config.model))
  tx, _ = optim.make_optimizer(config.optim, total_updates)
  # Compiled before any slow work, and held against each device's memory (one line if too big).
  train_step = device_memory.compile_train_step(
      config, lambda c: lower_train_step(c, model, mesh, total_updates), mesh.size)
  manager = checkpointing.make_manager(workdir, config.train)
  state, train_iter = restore_or_create(config, model, tx, mesh, manager, micro_batch)
  return train_loop(config, workdir, model, mesh, manager, state, train_iter, train_step,
                    (total_steps, total_updates))


def train_loop(config, workdir, model, mesh, manager, state, train_iter, train_step, totals):
  """Steps from the state's step to the last one, validating and checkpointing on the config's
  intervals, saving and returning early on SIGTERM; closes the manager; -> the last validation
  metrics (None with evaluation off)."""
  tr = config.train
  total_steps, total_updates = totals
  main = jax.process_index() == 0
  evaluating = tr.eval_every_steps > 0
  start = int(jax.device_get(state.step))
  base_rng = jnp.asarray(jax.device_get(state.rng))
  step_rng = jax.jit(jax.random.fold_in, out_shardings=sharding_lib.replicated(mesh))
  predict = make_predict_fn(model)
  logging.info('training: %d steps (%d optimizer updates of %d examples) from step %d on %d '
               'device(s), mesh %s', total_steps, total_updates, tr.global_batch_size, start,
               jax.device_count(), dict(mesh.shape))
  writer = Writer(workdir)
  preemption = _Preemption()
  bar = tqdm.tqdm(total=total_steps, initial=start, disable=not main, desc='train',
                  dynamic_ncols=True, file=sys.stderr)
  pending, result, last_eval, shown = [], None, None, None   # shown: the step of the last table
  try:
    for step in range(start + 1, total_steps + 1):   # `step`: train steps done after this one
      host_batch = next(train_iter)
      batch = sharding_lib.global_batch({k: host_batch[k] for k in TRAIN_KEYS}, mesh)
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
        manager.wait_until_finished()
        bar.close()
        logging.warning('preempted (SIGTERM): saved step %d to %s; exiting', step,
                        manager.directory)
        print(f'preempted: checkpoint of step {step} saved in {manager.directory}', flush=True)
        return result
    _flush(pending, writer, bar)
    bar.close()
    if evaluating and last_eval is None:   # resumed at the end: evaluate what is there
      variables = state.variables()
      result, _ = evaluation.evaluate_split(config, lambda b: predict(variables, b),
                                            config.data.val_split, mesh=mesh)
      last_eval = start
    manager.wait_until_finished()
  finally:
    bar.close()   # before any error message: the bar's line ends here
    preemption.close()
    writer.close()
    manager.close()   # waits for pending saves
  if main and result is not None and last_eval != shown:   # not already written by the loop
    print(format_table(config.data.val_split, last_eval, result), flush=True)
  return result
