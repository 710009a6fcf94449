"""Where the train step's time goes, op by op: a JAX profiler trace of the jitted step, summed.

  python benchmarks/profile_ops.py --config=configs/synthetic.py --batch=16 [--steps=5]
      [--target=step|vision_encoder] [--top=25] [--json_out=FILE]

The step (or, with --target=vision_encoder, the Swin alone: gradient of the sum of its stage maps
w.r.t. its parameters) is jitted, run once, then run --steps times under `jax.profiler.trace`. The
trace is read back with `jax.profiler.ProfileData`; every executed op (an XLA fusion, a dot, a
copy...) is mapped to the HLO instruction of the compiled executable and its source location
(`op_name` metadata: which module, forward or backward). Three tables, ms per step:
  - by kind of op: matmuls of the dense layers, the attention's batched matmuls, elementwise
    fusions, reductions, copies/transposes, convolutions, the rest;
  - by part of the model and pass: 'forward' is what JAX's linearisation runs (the forward pass
    and the derivatives it keeps for the backward, e.g. GELU's), 'backward' the transposed pass;
  - the --top most expensive ops.
Weights are random, the batch too (as benchmarks/train_step.py). On a backend whose trace has no
per-op events the script says so. Op times are summed over threads, so on a multi-core CPU their
sum can differ from the step's wall time (both are printed).
"""
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # pylint: disable=wrong-import-position
from benchmarks import train_step as train_step_bench  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  train_step_bench.define_flags()
  # --config, --batch, --steps and --json_out are benchmarks/train_step.py's flags.
  flags.DEFINE_enum('target', 'step', ['step', 'vision_encoder'], 'what to profile')
  flags.DEFINE_integer('top', 25, 'rows of the most expensive ops')


_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(')
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def hlo_instructions(hlo_text):
  """{instruction name: (shape, opcode, op_name metadata)} of a compiled module's text."""
  out = {}
  for line in hlo_text.split('\n'):
    m = _INSTRUCTION.match(line)
    if m:
      op_name = _OP_NAME.search(line)
      out.setdefault(m.group(1), (m.group(2), m.group(3), op_name.group(1) if op_name else ''))
  return out


def kind_of(name, opcode, op_name):
  """A coarse kind for an executed op, from its HLO instruction and source location."""
  last = op_name.split('/')[-1] if op_name else ''
  is_dot = 'dot_general' in last or opcode == 'dot' or name.startswith('dot')
  if is_dot and re.search(r'attn/[a-z]+,[a-z]+->', op_name):
    return 'attention batched matmuls'
  if is_dot:
    return 'dense matmuls (incl. weight gradients)'
  if 'conv' in last or opcode == 'convolution':
    return 'convolutions'
  if 'reduce' in last or name.startswith('reduce'):
    return 'reductions'
  if 'transpose' in name or 'copy' in name or opcode in ('copy', 'transpose'):
    return 'copies / transposes'
  if opcode == 'fusion' or 'fusion' in name or name.startswith('wrapped_'):
    return 'elementwise fusions'
  return 'other'


def part_of(op_name, modules, deep=('vision_encoder', 'text_encoder')):
  """'<module> (forward|backward)' from a source location like 'jit(f)/transpose(jvp(EAVL))/...'.

  modules: the model's top-level submodule names; ops outside them and outside the
  differentiated function (the loss's own ops, the optimizer update, metrics) are grouped apart;
  the modules in `deep` are split one level further (vision_encoder/layers_0, ...).
  """
  if 'transpose(' in op_name:
    stage = 'backward'
  elif 'jvp(' in op_name:
    stage = 'forward'
  else:
    return 'optimizer update, metrics (outside the gradient)'
  path = [p for p in op_name.split('/')[1:] if not p.startswith(('jvp(', 'transpose('))]
  if not path or path[0] not in modules:
    return f'loss and glue ({stage})'
  module = path[0]
  if module in deep and len(path) > 1:
    module += '/' + path[1]
  return f'{module} ({stage})'


def profile(fn, args, steps):
  """-> ({op name: total ns}, wall seconds per call) over `steps` traced calls of fn(*args)."""
  jax.block_until_ready(fn(*args))
  folder = tempfile.mkdtemp(prefix='eavl_profile_')
  start = time.perf_counter()
  with jax.profiler.trace(folder):
    for _ in range(steps):
      jax.block_until_ready(fn(*args))
  wall = (time.perf_counter() - start) / steps
  paths = glob.glob(os.path.join(folder, '**', '*.xplane.pb'), recursive=True)
  if not paths:
    return {}, wall
  data = jax.profiler.ProfileData.from_file(paths[0])
  totals = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name == 'python':
        continue
      for event in line.events:
        if 'ThunkExecutor' in event.name or 'Await' in event.name:
          continue
        totals[event.name] += event.duration_ns
  return totals, wall


def target_fn(step, batch_size, target):
  """-> (jitted function, its arguments, compiled HLO text)."""
  if target == 'step':
    state = jax.jit(step.init)(jax.random.PRNGKey(0))
    batch = jax.tree.map(jnp.asarray, train_step_bench.random_batch(step.config, batch_size))
    fn = jax.jit(step.step_fn)  # not donated: the same state is fed to every profiled call
    args = (state, batch, jax.random.PRNGKey(1))
  else:
    params = step.abstract_state.params
    calls, _ = train_step_bench.capture_components(
        step, {'params': params, 'batch_stats': step.abstract_state.batch_stats})
    module, abstract_args, kwargs = calls['vision_encoder']
    images = train_step_bench.concrete_like(abstract_args, 0)[0]
    sub = train_step_bench.concrete_like(params['vision_encoder'], 1)

    def loss(p, x):
      outs = module.apply({'params': p}, x, **kwargs, rngs={'dropout': jax.random.PRNGKey(0)})
      return sum(jnp.sum(o) for o in outs)
    fn, args = jax.jit(jax.grad(loss)), (sub, images)  # op_names: jit(loss)/jvp(...)/layers_0/...
  hlo = fn.lower(*args).compile().as_text()
  return fn, args, hlo


def tables(totals, instructions, steps, modules, deep):
  """Trace events that are instructions of the executable -> (by kind, by part, op rows)."""
  by_kind, by_part, ops = collections.Counter(), collections.Counter(), []
  for name, ns in totals.items():
    if name not in instructions:  # Python frames, runtime bookkeeping
      continue
    shape, opcode, op_name = instructions[name]
    ms = ns / steps / 1e6
    by_kind[kind_of(name, opcode, op_name)] += ms
    by_part[part_of(op_name, modules, deep)] += ms
    ops.append(dict(op=name, ms=ms, shape=shape, source=op_name))
  ops.sort(key=lambda r: -r['ms'])
  return by_kind, by_part, ops


def print_table(title, counter, total):
  print(f'\n{title:58s} {"ms/step":>9s} {"share":>7s}')
  for key, ms in counter.most_common():
    print(f'{key[:58]:58s} {ms:9.2f} {100 * ms / total:6.1f}%')


def main(argv):
  del argv
  config = train_step_bench.config_from_flags()
  step = train_step_bench.Step(config, FLAGS.batch)
  fn, args, hlo = target_fn(step, FLAGS.batch, FLAGS.target)
  totals, wall = profile(fn, args, FLAGS.steps)
  print(common.machine_line())
  print(f'target {FLAGS.target}, batch {FLAGS.batch}, {FLAGS.steps} profiled calls: '
        f'wall {1e3 * wall:.1f} ms per call (under the profiler)')
  if not totals:
    print('no per-op events in the trace on this backend: nothing to sum')
    return
  if FLAGS.target == 'step':
    modules, deep = set(step.abstract_state.params), ('vision_encoder', 'text_encoder')
  else:  # Swin alone: its stages, split into blocks
    modules = deep = set(step.abstract_state.params['vision_encoder'])
  by_kind, by_part, ops = tables(totals, hlo_instructions(hlo), FLAGS.steps, modules, deep)
  total = sum(by_kind.values())
  print(f'op time summed over threads: {total:.1f} ms per call')
  print_table('kind of op', by_kind, total)
  print_table('part of the model (pass)', by_part, total)
  print(f'\n{"op":32s} {"ms/step":>9s}  {"shape":34s} source')
  for r in ops[:FLAGS.top]:
    print(f'{r["op"][:32]:32s} {r["ms"]:9.2f}  {r["shape"][:34]:34s} {r["source"][-90:]}')
  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w') as f:
      json.dump(dict(machine=common.machine_line(), target=FLAGS.target, batch=FLAGS.batch,
                     wall_ms=1e3 * wall, op_ms=total, by_kind=dict(by_kind),
                     by_part=dict(by_part), top_ops=ops[:FLAGS.top]), f, indent=1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
