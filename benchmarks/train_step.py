"""The whole EAVL train step (forward + backward + AdamW update, jitted): speed, where the time
goes, compile time and memory, and on a GPU the model-FLOPs utilisation.

  python benchmarks/train_step.py [--config=configs/refcoco.py] [--config.model.remat=True ...]
      [--batch=1] [--steps=3] [--memory_batch=4] [--nocomponents] [--nomemory_table]
      [--json_out=FILE]

Weights are random (`vision_encoder.pretrained` and `text_encoder.pretrained` are set to 'scratch',
so nothing is read or downloaded; the sizes are the config's), the batch is random, one device.

Sections:
1. step: the jitted `steps.make_train_step` at --batch: compile time (lower + compile),
   steps/s and images/s (median of --steps after one warm-up step), XLA's FLOPs count.
2. components (where the time goes): every top-level submodule of the model is run alone, jitted,
   on inputs of the shapes it gets inside the train step at --batch (its images and expressions;
   captured with `flax.linen.intercept_methods` under `jax.eval_shape`), forward and
   forward+backward (gradient of the sum of its outputs w.r.t. its parameters and float inputs);
   plus the loss and the AdamW update. EAVL: vision_encoder, the LayerNorms, attention_pool,
   text_encoder, text_proj, neck, query_generator, decoder, aligner. LAVT (model.name='lavt'):
   vision_encoder (its Swin alone, without the fusion between stages), text_encoder, pwam_i,
   gate_i, output_norm_i, decoder, classifier or aligner_head. Sub-functions jitted apart lose
   XLA's fusion across their borders, so their sum is compared with the whole step.
3. memory table: the step lowered and compiled, without running it, at --memory_batch for
   model.remat in {False, True} x model.dtype in {float32, bfloat16}: compile time and the
   executable's memory_analysis() (arguments + outputs + temporaries - aliased (donated) bytes).
4. GPU: images/s and model-FLOPs utilisation (FLOPs of the compiled step / step time / the
   device's peak); skipped on other backends.
"""
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # pylint: disable=wrong-import-position
from eavl_jax import hub  # pylint: disable=wrong-import-position
from eavl_jax import losses  # pylint: disable=wrong-import-position
from eavl_jax import optim  # pylint: disable=wrong-import-position
from eavl_jax import train_state as train_state_lib  # pylint: disable=wrong-import-position
from eavl_jax import steps as steps_lib  # pylint: disable=wrong-import-position
from eavl_jax.models import builder  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  config_flags.DEFINE_config_file('config', 'configs/refcoco.py', 'Experiment config file.')
  flags.DEFINE_integer('batch', 1, 'per-device batch of the timed step')
  flags.DEFINE_integer('steps', 3, 'timed steps (median) after one warm-up step')
  flags.DEFINE_boolean('components', True, 'time every component alone')
  flags.DEFINE_boolean('memory_table', True, 'compile (no run) the 4 remat x dtype variants')
  flags.DEFINE_integer('memory_batch', 4, 'per-device batch of the memory table')
  flags.DEFINE_string('json_out', '', 'also write the results here as JSON')


# Dense peak FLOP/s by device_kind substring (first match): (bfloat16, float32). float32 uses the
# TF32 tensor-core peak, since JAX's default matmul precision runs float32 matmuls as TF32 on these
# GPUs. From the vendors' data sheets (SXM parts unless named).
PEAK_FLOPS = {
    'H200': (989e12, 494e12),
    'H100 PCIe': (756e12, 378e12),
    'H100': (989e12, 494e12),
    'A100': (312e12, 156e12),
}


def config_from_flags():
  config = ml_collections.ConfigDict(FLAGS.config.to_dict())
  config.model.vision_encoder.pretrained = hub.SCRATCH   # random weights, on purpose: the
  config.model.text_encoder.pretrained = hub.SCRATCH     # step time does not depend on them
  return config


def random_batch(config, batch_size, seed=0):
  """batch_size expressions; batch_size / data.refs_per_image images (the train loader's rows)."""
  rng = np.random.default_rng(seed)
  s, l = config.model.image_size, config.model.max_tokens
  images = batch_size // config.data.refs_per_image
  ids = rng.integers(1000, 30000, size=(batch_size, l)).astype(np.int32)
  return {'image': rng.normal(size=(images, s, s, 3)).astype(np.float32),
          'input_ids': ids, 'attention_mask': np.ones_like(ids),
          'mask': (rng.random((batch_size, s, s)) > 0.5).astype(np.uint8)}


def _abstract(tree):
  """Arrays (and tracers) -> ShapeDtypeStructs; Python values (ints, None) stay."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
                      if hasattr(x, 'dtype') else x, tree)


class Step:
  """The jitted train step of `config`, its abstract state and batch."""

  def __init__(self, config, batch_size):
    self.config, self.batch_size = config, batch_size
    if batch_size % config.data.refs_per_image:
      raise ValueError(f'--batch={batch_size} expressions is not a multiple of the config\'s '
                       f'data.refs_per_image={config.data.refs_per_image}')
    self.model = builder.build_model(config.model)
    self.tx, schedule = optim.make_optimizer(config.optim, total_updates=10**6)
    self.init = train_state_lib.make_init_fn(self.model, config.model, self.tx)
    self.abstract_state = jax.eval_shape(self.init, jax.random.PRNGKey(0))
    frozen = optim.frozen_mask(config.optim, self.abstract_state.params)
    self.step_fn = steps_lib.make_train_step(self.model, self.tx, schedule, config, frozen)
    self.jitted = jax.jit(self.step_fn, donate_argnums=0)
    self.abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype)
        for k, v in random_batch(config, batch_size).items()}

  def compile(self):
    """-> (compiled, seconds to lower, seconds to compile)."""
    start = time.perf_counter()
    lowered = self.jitted.lower(self.abstract_state, self.abstract_batch,
                                jax.ShapeDtypeStruct((2,), jnp.uint32))
    mid = time.perf_counter()
    compiled = lowered.compile()
    return compiled, mid - start, time.perf_counter() - mid


def memory_of(compiled):
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, f'{k}_size_in_bytes')) for k in ('argument', 'output', 'temp', 'alias')}
  out['peak_estimate'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def flops_of(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def time_step(step, compiled, steps):
  state = jax.jit(step.init)(jax.random.PRNGKey(0))
  batch = jax.tree.map(jnp.asarray, random_batch(step.config, step.batch_size))
  rng = jax.random.PRNGKey(1)
  times = []
  for i in range(steps + 1):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics['loss'])
    if i:  # the first step is a warm-up
      times.append(time.perf_counter() - start)
  return float(np.median(times)), float(metrics['loss'])


# ------------------------------------------------------------------ components


def capture_components(step, variables):
  """-> ({name: (unbound module, abstract args, kwargs)} for every call of a submodule of the
  top-level model, the model's abstract outputs), on the train step's batch (its images and
  expressions). A callable keyword (LAVT's Swin gets its fusion step as `between_stages`) is
  dropped: that submodule is timed alone, and the modules the callable calls are captured as
  calls of their own."""
  calls = {}
  batch = random_batch(step.config, step.batch_size)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    parent = module.parent   # a submodule of the top-level model (whose parent is a Scope)
    if context.method_name == '__call__' and isinstance(parent, nn.Module) \
        and not isinstance(parent.parent, nn.Module):
      plain = {k: v for k, v in kwargs.items() if not callable(v)}
      calls[module.name] = (module.clone(parent=None), _abstract(args), plain)
    return next_fun(*args, **kwargs)

  def forward(v):
    with nn.intercept_methods(interceptor):
      return step.model.apply(v, batch['image'], batch['input_ids'], batch['attention_mask'],
                              train=True, refs_per_image=step.config.data.refs_per_image,
                              rngs={'dropout': jax.random.PRNGKey(0)},
                              mutable=['batch_stats'])[0]
  out_shapes = jax.eval_shape(forward, variables)
  return calls, out_shapes


def concrete_like(abstract_args, seed):
  rng = np.random.default_rng(seed)
  def one(x):
    if not isinstance(x, jax.ShapeDtypeStruct):
      return x
    if jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.asarray(rng.normal(size=x.shape), x.dtype)
    return jnp.ones(x.shape, x.dtype)  # input_ids / attention masks: every token real
  return jax.tree.map(one, abstract_args, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def _sum_floats(tree):
  return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating))


def time_components(step, variables, repeats):
  """-> rows {component, fwd_s, fwd_bwd_s} for each submodule, the loss and the update."""
  calls, out_shapes = capture_components(step, variables)
  rngs = {'dropout': jax.random.PRNGKey(0)}
  rows = []
  for i, (name, (module, abstract_args, kwargs)) in enumerate(calls.items()):
    args = concrete_like(abstract_args, i)
    is_float = [hasattr(a, 'dtype') and jnp.issubdtype(a.dtype, jnp.floating) for a in args]
    stats = {'batch_stats': variables['batch_stats'][name]} \
        if name in variables.get('batch_stats', {}) else {}

    def run(p, float_args, module=module, kwargs=kwargs, args=args, is_float=is_float,
            stats=stats):
      it = iter(float_args)
      full = [next(it) if f else a for a, f in zip(args, is_float)]
      return module.apply({'params': p, **stats}, *full, **kwargs, rngs=rngs,
                          mutable=['batch_stats'])[0]
    float_args = [a for a, f in zip(args, is_float) if f]
    sub = variables['params'].get(name, {})
    fwd = jax.jit(run).lower(sub, float_args).compile()
    grad = jax.jit(jax.grad(lambda p, fa, run=run: _sum_floats(run(p, fa)), argnums=(0, 1))
                   ).lower(sub, float_args).compile()
    fwd_s = common.median_seconds(lambda: jax.block_until_ready(fwd(sub, float_args)), repeats)
    bwd_s = common.median_seconds(lambda: jax.block_until_ready(grad(sub, float_args)), repeats)
    rows.append(dict(component=name, fwd_s=fwd_s, fwd_bwd_s=bwd_s, fwd_bwd_flops=flops_of(grad)))
    print(f'  {name}: fwd {1e3 * fwd_s:.1f} ms, fwd+bwd {1e3 * bwd_s:.1f} ms, '
          f'{flops_of(grad) / 1e9:.2f} GFLOP', flush=True)

  logits = jnp.asarray(np.random.default_rng(0).normal(size=out_shapes['logits'].shape),
                       jnp.float32)
  mask = jnp.asarray(random_batch(step.config, step.batch_size)['mask'])
  corners = losses.corners_aligned(step.config.model)
  loss = jax.jit(lambda l: losses.loss_fn(l, mask, step.config.loss, corners))
  loss_grad = jax.jit(jax.grad(lambda l: losses.loss_fn(l, mask, step.config.loss, corners))
                      ).lower(logits).compile()
  rows.append(dict(component='loss',
                   fwd_s=common.median_seconds(lambda: jax.block_until_ready(loss(logits)),
                                               repeats),
                   fwd_bwd_s=common.median_seconds(
                       lambda: jax.block_until_ready(loss_grad(logits)), repeats),
                   fwd_bwd_flops=flops_of(loss_grad)))

  params = variables['params']
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, p.dtype), params)
  opt_state = jax.jit(step.tx.init)(params)
  def update(g, s, p):
    updates, s = step.tx.update(g, s, p)
    return jax.tree.map(jnp.add, p, updates), s
  update = jax.jit(update).lower(grads, opt_state, params).compile()
  update_s = common.median_seconds(
      lambda: jax.block_until_ready(update(grads, opt_state, params)), repeats)
  rows.append(dict(component='AdamW update', fwd_s=0.0, fwd_bwd_s=update_s,
                   fwd_bwd_flops=flops_of(update)))
  return rows


GROUPS = {
    'eavl': (('Swin (vision_encoder)', ('vision_encoder',)),
             ('attention pooling (eq. 1)', ('attention_pool',)),
             ('BERT (text_encoder)', ('text_encoder',)),
             ('neck + query generator + decoder (+ norms, text_proj)',
              ('vision_norm_2', 'vision_norm_3', 'vision_norm_4', 'text_proj', 'neck',
               'query_generator', 'decoder')),
             ('aligner (eq. 11-14)', ('aligner',)),
             ('loss', ('loss',))),
    'lavt': (('Swin (vision_encoder, without the fusion)', ('vision_encoder',)),
             ('BERT (text_encoder)', ('text_encoder',)),
             ('PWAMs + language gates', tuple(f'pwam_{i}' for i in range(4))
              + tuple(f'gate_{i}' for i in range(3))),
             ('simple decoder (+ output norms)',
              ('decoder',) + tuple(f'output_norm_{i}' for i in range(4))),
             ('head (classifier / aligner_head)', ('classifier', 'aligner_head')),
             ('loss', ('loss',))),
}


def print_components(rows, step_s, model_name, step_flops):
  """The groups of GROUPS[model_name]: ms, % of the step, and XLA's GFLOP of the fwd+bwd (of
  the update for AdamW), which, unlike the times, do not depend on the machine's load."""
  by_name = {r['component']: r for r in rows}
  print(f'\n{"component":<56} {"fwd ms":>9} {"fwd+bwd ms":>11} {"% of step":>10} '
        f'{"fwd+bwd GFLOP":>14}')
  table = []
  for label, names in GROUPS[model_name]:
    parts = [by_name[n] for n in names if n in by_name]
    table.append(dict(group=label, fwd_s=sum(r['fwd_s'] for r in parts),
                      fwd_bwd_s=sum(r['fwd_bwd_s'] for r in parts),
                      fwd_bwd_flops=sum(r['fwd_bwd_flops'] for r in parts)))
  update = by_name['AdamW update']
  table.append(dict(group='AdamW update', fwd_s=0.0, fwd_bwd_s=update['fwd_bwd_s'],
                    fwd_bwd_flops=update['fwd_bwd_flops']))
  sum_fwd = sum(r['fwd_s'] for r in table)
  sum_fb = sum(r['fwd_bwd_s'] for r in table)
  sum_flops = sum(r['fwd_bwd_flops'] for r in table)
  for r in table:
    print(f'{r["group"]:<56} {1e3 * r["fwd_s"]:>9.1f} {1e3 * r["fwd_bwd_s"]:>11.1f} '
          f'{100 * r["fwd_bwd_s"] / step_s:>9.1f}% {r["fwd_bwd_flops"] / 1e9:>14.2f}')
  print(f'{"sum of the parts":<56} {1e3 * sum_fwd:>9.1f} {1e3 * sum_fb:>11.1f} '
        f'{100 * sum_fb / step_s:>9.1f}% {sum_flops / 1e9:>14.2f}')
  print(f'{"whole jitted train step":<56} {"":>9} {1e3 * step_s:>11.1f} {100.0:>9.1f}% '
        f'{step_flops / 1e9:>14.2f}')
  print(f'backward + update = step - sum of forwards = {1e3 * (step_s - sum_fwd):.1f} ms '
        f'({100 * (step_s - sum_fwd) / step_s:.1f}% of the step)')
  return table


# ------------------------------------------------------------------ memory table


def memory_table(config, batch_size):
  rows = []
  for remat in (False, True):
    for dtype in ('float32', 'bfloat16'):
      c = ml_collections.ConfigDict(config.to_dict())
      c.model.remat, c.model.dtype = remat, dtype
      compiled, lower_s, compile_s = Step(c, batch_size).compile()
      row = dict(remat=remat, dtype=dtype, batch=batch_size, lower_s=lower_s,
                 compile_s=compile_s, flops=flops_of(compiled), **memory_of(compiled))
      rows.append(row)
      print(f'  remat={remat} dtype={dtype}: lower {lower_s:.1f} s, compile {compile_s:.1f} s, '
            f'peak {row.get("peak_estimate", 0) / 2**30:.2f} GiB', flush=True)
      del compiled
  gib = lambda x: f'{x / 2**30:.2f}'
  print(f'\n{"remat":<6} {"dtype":<9} {"batch":>5} {"compile s":>10} {"args GiB":>9} '
        f'{"out GiB":>8} {"temp GiB":>9} {"alias GiB":>10} {"peak GiB":>9} {"TFLOP/step":>11}')
  for r in rows:
    print(f'{str(r["remat"]):<6} {r["dtype"]:<9} {r["batch"]:>5} '
          f'{r["lower_s"] + r["compile_s"]:>10.1f} {gib(r["argument"]):>9} {gib(r["output"]):>8} '
          f'{gib(r["temp"]):>9} {gib(r["alias"]):>10} {gib(r["peak_estimate"]):>9} '
          f'{r["flops"] / 1e12:>11.2f}')
  return rows


# ------------------------------------------------------------------ GPU


def peak_flops(device_kind, dtype):
  for key, (bf16, fp32) in PEAK_FLOPS.items():
    if key.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else fp32
  return None


def gpu_section(config, result):
  if jax.default_backend() != 'gpu':
    print(f'\nGPU section skipped: backend is {jax.default_backend()}')
    return None
  kind = jax.devices()[0].device_kind
  peak = peak_flops(kind, config.model.dtype)
  flops_per_s = result['flops'] / result['step_s']
  mfu = flops_per_s / peak if peak else float('nan')
  print(f'\nGPU {kind}: {result["images_per_s"]:.2f} images/s at batch {result["batch"]} '
        f'({config.model.dtype}), {flops_per_s / 1e12:.1f} TFLOP/s of the compiled step; '
        f'peak {peak / 1e12 if peak else float("nan"):.0f} TFLOP/s -> MFU {100 * mfu:.1f}%')
  print('peaks used (dense, TFLOP/s, bf16 / fp32 as TF32): ' + ', '.join(
      f'{k} {b / 1e12:.0f}/{f / 1e12:.0f}' for k, (b, f) in PEAK_FLOPS.items()))
  return dict(device_kind=kind, peak_flops=peak, achieved_flops_per_s=flops_per_s, mfu=mfu)


def main(argv):
  del argv
  config = config_from_flags()
  machine = common.machine_line()
  print(machine)
  m = config.model
  print(f'config: image {m.image_size}², max_tokens {m.max_tokens}, Swin depths '
        f'{tuple(m.vision_encoder.depths)} embed {m.vision_encoder.embed_dim}, BERT '
        f'{m.text_encoder.num_hidden_layers}x{m.text_encoder.hidden_size}, dtype {m.dtype}, '
        f'remat {m.remat}, conv_impl {m.aligner.conv_impl}; batch {FLAGS.batch}', flush=True)
  out = {'machine': machine, 'config': config.to_dict()}

  step = Step(config, FLAGS.batch)
  compiled, lower_s, compile_s = step.compile()
  print(f'train step compile: lower {lower_s:.1f} s + compile {compile_s:.1f} s', flush=True)
  step_s, loss = time_step(step, compiled, FLAGS.steps)
  result = dict(batch=FLAGS.batch, lower_s=lower_s, compile_s=compile_s, step_s=step_s,
                steps_per_s=1 / step_s, images_per_s=FLAGS.batch / step_s, loss=loss,
                flops=flops_of(compiled), memory=memory_of(compiled))
  del compiled
  print(f'\n{"batch":>5} {"compile s":>10} {"step s":>8} {"steps/s":>8} {"images/s":>9} '
        f'{"TFLOP/step":>11} {"GFLOP/s":>8} {"peak GiB":>9}')
  print(f'{FLAGS.batch:>5} {lower_s + compile_s:>10.1f} {step_s:>8.3f} {1 / step_s:>8.3f} '
        f'{FLAGS.batch / step_s:>9.3f} {result["flops"] / 1e12:>11.3f} '
        f'{result["flops"] / step_s / 1e9:>8.1f} '
        f'{result["memory"].get("peak_estimate", 0) / 2**30:>9.2f}', flush=True)
  out['step'] = result

  save(out)

  if FLAGS.components:
    print(f'\ncomponents, each jitted alone (median of {FLAGS.steps} after one warm-up):',
          flush=True)
    variables = jax.jit(lambda k: step.model.init(k, *builder.dummy_inputs(config.model, 1),
                                                  train=False))(jax.random.PRNGKey(0))
    try:
      rows = time_components(step, variables, repeats=FLAGS.steps)
      out['components'] = rows
      out['component_groups'] = print_components(rows, step_s, config.model.name,
                                                 result['flops'])
    except Exception as e:  # pylint: disable=broad-except
      print(f'components FAILED ({type(e).__name__}: {e}); going on with the memory table')
      out['components_error'] = repr(e)
    del variables
    save(out)

  if FLAGS.memory_table:
    print(f'\nmemory table: compile only, per-device batch {FLAGS.memory_batch}:', flush=True)
    out['memory_table'] = memory_table(config, FLAGS.memory_batch)
    save(out)

  out['gpu'] = gpu_section(config, result)
  save(out)


def save(out):
  """Written after every section, so that a run cut short keeps what it measured."""
  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w') as f:
      json.dump(out, f, indent=1, default=str)


if __name__ == '__main__':
  define_flags()
  app.run(main)
