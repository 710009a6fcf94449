"""Parameter count per component, without allocating the weights; forward cost and speed.

  python -m eavl_jax.model_info --config=configs/refcoco.py [--json] [--flops] [--speed]

Two counts: every parameter, and table VI's convention (TABLE_VI_RULE: what a hook-based counter
such as thop sums, the way the paper's table VI was most likely counted; docs/evaluation.md).

--flops: FLOPs of one forward pass (inference, batch --batch_size, reported per image) from XLA's
cost analysis of the compiled program; multiply-adds = FLOPs / 2 (XLA counts a multiply-add as 2).
--speed: images/s of the jitted forward pass on the present backend (random weights: the time does
not depend on their values), the median of --iterations timed runs after --warmup runs.
Both are printed beside the paper's table VI row.
"""
import json
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from eavl_jax import cli
from eavl_jax import errors
from eavl_jax import train_state
from eavl_jax import weights
from eavl_jax.models import builder

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  cli.define_config_flag()
  flags.DEFINE_bool('json', False, 'Print one JSON object instead of the table.')
  flags.DEFINE_bool('flops', False, "Forward cost from XLA's cost analysis.")
  flags.DEFINE_bool('speed', False, 'Images/s of jitted inference on this backend.')
  flags.DEFINE_integer('batch_size', 1, 'Batch of the compiled forward (--flops, --speed).')
  flags.DEFINE_integer('iterations', 5, 'Timed runs for --speed (median reported).')
  flags.DEFINE_integer('warmup', 2, 'Untimed runs before timing (--speed).')


# Top-level parameter subtree -> reported component.
COMPONENTS = {
    'vision_encoder': 'swin', 'vision_norm_2': 'swin', 'vision_norm_3': 'swin',
    'vision_norm_4': 'swin',
    'attention_pool': 'attention pooling',
    'text_encoder': 'bert', 'text_proj': 'query generator',
    'neck': 'neck',
    'query_generator': 'query generator',
    'decoder': 'decoder',
    'aligner': 'aligner',
    # LAVT (model.name='lavt'): its decoder is 'decoder'; the aligner head holds its own
    # attention pooling, query generator and aligner.
    **{f'output_norm_{i}': 'swin' for i in range(4)},
    **{f'pwam_{i}': 'pixel-word attention' for i in range(4)},
    **{f'gate_{i}': 'language gate' for i in range(4)},
    'classifier': 'classifier', 'aligner_head': 'aligner',
}
ORDER = ('swin', 'attention pooling', 'bert', 'pixel-word attention', 'language gate', 'neck',
         'query generator', 'decoder', 'classifier', 'aligner')  # those the model has are listed
# Table VI's convention: a hook-based counter (thop) adds up the parameters of the Linear, Conv and
# norm layers that run, so it leaves out nn.Embedding tables and parameters a module holds itself.
# In the Flax tree: Dense / Conv kernels and biases, norm scales and biases count ('kernel',
# 'bias', 'scale' leaves); BERT's word / position / token-type tables ('embedding') and Swin's
# relative_position_bias_table do not.
TABLE_VI_LEAVES = ('kernel', 'bias', 'scale')
TABLE_VI_RULE = ("table VI rule: the parameters of Dense / Conv / norm layers, as hook-based "
                 "counters (thop) count them; no embedding tables (BERT's word, position and "
                 "token-type embeddings), no parameters held outside such layers (Swin's "
                 "relative-position bias tables)")
# Table VI's rows, Swin-Base and BERT-Base, 480x480 input: GFLOPs, parameters (M), inference FPS
# (the paper names its 8 RTX Titan GPUs for training, not the inference GPU), RefCOCO+ val mIoU.
# By config.model.name; table VI has no LAVT + aligner row, so both LAVT heads sit beside LAVT's.
PAPER_ROWS = {
    'eavl': {'row': 'Ours (EAVL)', 'gflops': 131.01, 'params_m': 202.11, 'fps': 8.78,
             'refcocop_val_miou': 67.95, 'image_size': 480},
    'lavt': {'row': 'LAVT', 'gflops': 124.71, 'params_m': 203.71, 'fps': 6.69,
             'refcocop_val_miou': 65.81, 'image_size': 480},
}


def abstract_params(model_config, batch_size=1):
  """The parameter tree as ShapeDtypeStructs."""
  return train_state.abstract_variables(model_config, batch_size)['params']


def counted_in_table_vi(path) -> bool:
  """Whether table VI's convention (TABLE_VI_RULE) counts the parameter at `path`."""
  return path[-1].key in TABLE_VI_LEAVES


def count_by_component(params, table_vi=False):
  """{component: parameters} of the model's components (ORDER); table_vi: TABLE_VI_RULE's."""
  counts = {name: 0 for name in ORDER}
  for top, subtree in params.items():
    if top not in COMPONENTS:
      raise KeyError(f'parameter subtree {top!r} has no component in model_info.COMPONENTS')
    counts[COMPONENTS[top]] += sum(
        int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(subtree)
        if not table_vi or counted_in_table_vi(path))
  present = {COMPONENTS[top] for top in params}
  return {name: n for name, n in counts.items() if name in present}


def format_table(counts, table_vi_counts, paper):
  """Both counts per component, their totals, the paper's total (`paper`: a PAPER_ROWS row)
  and the rule."""
  total, total_vi = sum(counts.values()), sum(table_vi_counts.values())
  head = f'{"component":<20} {"all":>14} {"M":>9} {"table VI rule":>14} {"M":>9}'
  rows = [head, '-' * len(head)]
  rows += [f'{k:<20} {v:>14,} {v / 1e6:>9.2f} {table_vi_counts[k]:>14,} '
           f'{table_vi_counts[k] / 1e6:>9.2f}' for k, v in counts.items()]
  rows += ['-' * len(head),
           f'{"total":<20} {total:>14,} {total / 1e6:>9.2f} {total_vi:>14,} {total_vi / 1e6:>9.2f}',
           f'{"paper (table VI)":<20} {"":>14} {"":>9} {"":>14} {paper["params_m"]:>9.2f}'
           f'  {paper["row"]}',
           TABLE_VI_RULE + '.']
  return '\n'.join(rows)


def compile_forward(model_config, batch_size=1, shapes=None):
  """The jitted inference forward pass (params, image, ids, mask) -> logits, compiled.
  shapes: abstract_params(model_config) if already at hand."""
  model = builder.build_model(model_config)
  # BatchNorm's running averages (model.head_norm='batch') as at initialisation: mean 0, var 1.
  stats = jax.tree_util.tree_map_with_path(
      lambda path, x: (jnp.ones if path[-1].key == 'var' else jnp.zeros)(x.shape, x.dtype),
      train_state.abstract_variables(model_config)['batch_stats'])
  forward = jax.jit(lambda params, *inputs: model.apply(
      {'params': params, 'batch_stats': stats}, *inputs, train=False)['logits'])
  inputs = builder.dummy_inputs(model_config, batch_size)
  params = abstract_params(model_config) if shapes is None else shapes
  return forward.lower(params, *inputs).compile()


def forward_cost(compiled, batch_size):
  """XLA's cost analysis of a compiled forward of `batch_size` images -> per-image FLOPs, MACs."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0]
  if not analysis or 'flops' not in analysis:
    raise RuntimeError(f'the {jax.default_backend()} backend gave no FLOP count: {analysis!r}')
  flops = float(analysis['flops']) / batch_size
  return {'flops_per_image': flops, 'macs_per_image': flops / 2, 'batch_size': batch_size}


def random_params(model_config, seed=0, shapes=None):
  """Random weights of the right shapes (N(0, 0.02)) on the default device, drawn with numpy:
  no compile of model.init, and no one-off compile per parameter shape."""
  shapes = abstract_params(model_config) if shapes is None else shapes
  rng = np.random.default_rng(seed)
  return jax.device_put(jax.tree.map(
      lambda x: (0.02 * rng.standard_normal(x.shape, np.float32)).astype(x.dtype), shapes))


def inference_speed(compiled, model_config, batch_size, iterations=5, warmup=2, shapes=None):
  """Images/s of `compiled` on the default backend: batch / median seconds per call."""
  if iterations < 1 or warmup < 0:
    raise ValueError(f'--iterations={iterations} must be >= 1 and --warmup={warmup} >= 0')
  params = random_params(model_config, shapes=shapes)
  inputs = [jnp.asarray(x) for x in builder.dummy_inputs(model_config, batch_size)]
  for _ in range(warmup):
    jax.block_until_ready(compiled(params, *inputs))
  seconds = []
  for _ in range(iterations):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, *inputs))
    seconds.append(time.perf_counter() - start)
  median = statistics.median(seconds)
  return {'images_per_second': batch_size / median, 'seconds_per_batch': median,
          'batch_size': batch_size, 'iterations': iterations, 'backend': jax.default_backend(),
          'device': jax.devices()[0].device_kind}


def format_cost(model_config, total, cost=None, speed=None):
  """Our row beside the paper's table VI row; total: parameters under TABLE_VI_RULE."""
  s = model_config.image_size
  head = f'{"":<18} {"GFLOPs":>9} {"GMACs":>9} {"params (M)":>11} {"images/s":>9}  device'
  ours = f'{"eavl_jax":<18} '
  ours += f'{cost["flops_per_image"] / 1e9:>9.3f} {cost["macs_per_image"] / 1e9:>9.3f} ' if cost \
      else f'{"-":>9} {"-":>9} '
  ours += f'{total / 1e6:>11.2f} '
  ours += f'{speed["images_per_second"]:>9.2f}  {speed["backend"]} ({speed["device"]}), ' \
          f'batch {speed["batch_size"]}' if speed else f'{"-":>9}'
  p = PAPER_ROWS[model_config.name]
  paper = (f'{"paper (table VI)":<18} {p["gflops"]:>9.2f} {"-":>9} {p["params_m"]:>11.2f} '
           f'{p["fps"]:>9.2f}  {p["row"]}, their GPU, 480x480 (RefCOCO+ val mIoU '
           f'{p["refcocop_val_miou"]})')
  notes = [f'Forward pass (inference) at {s}x{s}, per image; XLA cost analysis of the compiled '
           'program; multiply-adds = FLOPs / 2.',
           'Tools that count one multiply-add as one FLOP (fvcore, thop) report GMACs as "GFLOPs".',
           'params: under the table VI rule (above).']
  return '\n'.join([head, '-' * len(head), ours, paper] + notes)


def main(argv):
  del argv
  config = FLAGS.config
  if config is None:
    raise app.UsageError('--config is required')
  # Here, not at the top: the data layer's packages it loads (pycocotools, ...) are not needed by
  # the library functions above (benchmarks/device_check.py runs them on a bare GPU machine).
  from eavl_jax import config_check  # pylint: disable=g-import-not-at-top
  try:   # every config key and flag before anything is traced or compiled
    config_check.validate(config)
    if FLAGS.batch_size < 1 or FLAGS.iterations < 1 or FLAGS.warmup < 0:
      raise ValueError(f'--batch_size={FLAGS.batch_size} and --iterations={FLAGS.iterations} must '
                       f'be >= 1, --warmup={FLAGS.warmup} >= 0')
    config.model = weights.with_checkpoint_text_sizes(config.model)   # BERT sizes of config.json
    shapes = abstract_params(config.model)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(errors.error_message(e))
  counts = count_by_component(shapes)
  table_vi_counts = count_by_component(shapes, table_vi=True)
  total, total_vi = sum(counts.values()), sum(table_vi_counts.values())
  cost = speed = None
  if FLAGS.flops or FLAGS.speed:
    try:
      compiled = compile_forward(config.model, FLAGS.batch_size, shapes)
      if FLAGS.flops:
        cost = forward_cost(compiled, FLAGS.batch_size)
      if FLAGS.speed:
        speed = inference_speed(compiled, config.model, FLAGS.batch_size, FLAGS.iterations,
                                FLAGS.warmup, shapes)
    except (ValueError, RuntimeError) as e:  # no FLOP count on this backend, bad --iterations
      sys.exit(f'error: {e}')
  if FLAGS.json:
    out = {'components': counts, 'total': total, 'components_table_vi': table_vi_counts,
           'total_table_vi': total_vi, 'table_vi_rule': TABLE_VI_RULE}
    if cost:
      out['flops'] = cost
    if speed:
      out['speed'] = speed
    if cost or speed:
      out['paper_table_vi'] = PAPER_ROWS[config.model.name]
    print(json.dumps(out))
  else:
    print(format_table(counts, table_vi_counts, PAPER_ROWS[config.model.name]))
    if cost or speed:
      print()
      print(format_cost(config.model, total_vi, cost, speed))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
