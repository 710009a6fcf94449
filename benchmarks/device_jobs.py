"""The jobs of benchmarks/device_check.py, each in a process of its own:

  python -m benchmarks.device_jobs {train,inference,dynamic_conv,numerics} --out=FILE [--smoke]
      [--model=paper|lavt] [--dtype=float32|bfloat16] [--remat]

Each writes FILE (JSON, the keys of device_check.KEYS[job]) after every measurement, so that a job
stopped at its budget leaves what it had. Weights and batches are random: nothing is read from
disk or downloaded (the encoders are 'scratch', no tokenizer is needed). Imports only jax, flax,
optax, transformers, absl and ml_collections (not the data pipeline's packages).
"""
import argparse
import contextlib
import time

import jax
import ml_collections
import numpy as np
import optax

from benchmarks import common
from benchmarks import device_check
from benchmarks import dynamic_conv as dynamic_conv_bench
from benchmarks import train_step as train_step_bench
from configs import lavt_refcoco
from configs import refcoco
from configs import tiny
from eavl_jax import hub
from eavl_jax import losses
from eavl_jax import model_info
from eavl_jax.models import dynamic_conv
from eavl_jax.models import builder

REFCOCO_TRAIN_REFS = 42404   # RefCOCO (UNC) train split; one sentence per ref and epoch
PAPER_GPUS, PAPER_HOURS = 8, 58.4   # the paper's training: 8 GPUs, 58.4 h for 40 epochs
SMOKE_CONV_SHAPE = {'tiny (B=2, 16², C_p=8, N_q=4)': (2, 16, 16, 8, 4)}
CONFIGS = {'paper': ('configs/refcoco.py', refcoco), 'lavt': ('configs/lavt_refcoco.py',
                                                               lavt_refcoco)}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('job', choices=sorted(device_check.KEYS))
  parser.add_argument('--out', required=True)
  parser.add_argument('--smoke', action='store_true')
  parser.add_argument('--model', choices=sorted(CONFIGS), default='paper')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  parser.add_argument('--remat', action='store_true')
  return parser.parse_args()


class Record(dict):
  """The job's figures, written to --out at every save()."""

  def __init__(self, path):
    super().__init__(machine=common.machine_line(), backend=jax.default_backend(),
                     device_kind=jax.devices()[0].device_kind)
    self.path = path

  def save(self, **figures):
    self.update(figures)
    device_check.write_json(self.path, dict(self))


def model_config(name, smoke):
  """The config file's config, random encoders; --smoke: at configs/tiny.py's model sizes, one
  block per Swin stage and one BERT layer (its kind of model, head, loss and optimizer kept).
  -> (config, what it is)."""
  path, module = CONFIGS[name]
  config = module.get_config()
  config.model.vision_encoder.pretrained = hub.SCRATCH
  config.model.text_encoder.pretrained = hub.SCRATCH
  if not smoke:
    return config, f'{path}, random weights'
  small = tiny.get_config().model
  for key in ('image_size', 'max_tokens', 'hidden_dim', 'num_queries', 'vision_encoder',
              'text_encoder', 'decoder'):
    config.model[key] = ml_collections.ConfigDict(small[key].to_dict()) \
        if isinstance(small[key], ml_collections.ConfigDict) else small[key]
  config.model.aligner.estimator_heads = small.aligner.estimator_heads
  config.model.vision_encoder.depths = (1, 1, 1, 1)   # fewer blocks still: less to compile
  config.model.text_encoder.num_hidden_layers = 1
  return config, (f"{path} at configs/tiny.py's model sizes (Swin depths 1, BERT 1 layer), "
                  'random weights (smoke)')


# ------------------------------------------------------------------ train step


def projection(images_per_s, config, smoke):
  examples = config.train.num_epochs * REFCOCO_TRAIN_REFS
  return dict(
      gpus=PAPER_GPUS, epochs=config.train.num_epochs, train_refs=REFCOCO_TRAIN_REFS,
      examples=examples, hours=examples / (PAPER_GPUS * images_per_s) / 3600,
      paper_hours=PAPER_HOURS if config.model.name == 'eavl' else None,
      of='the smoke run\'s tiny model on the CPU, not the paper\'s' if smoke else 'this step',
      assumption_short='linear data-parallel scaling',
      assumption=(f'{PAPER_GPUS} GPUs each at the images/s measured here on one at global batch '
                  f'{config.train.global_batch_size} (linear data-parallel scaling: gradient '
                  'all-reduce, input pipeline, evaluation and checkpoints cost nothing); with the '
                  f'global batch split over {PAPER_GPUS} GPUs each holds '
                  f'{config.train.global_batch_size // PAPER_GPUS}, where a GPU may run slower '
                  'per image, so this is a lower bound on the time'))


def train_job(args, record):
  config, what = model_config(args.model, args.smoke)
  config.model.dtype, config.model.remat = args.dtype, args.remat
  batch = 2 if args.smoke else config.train.global_batch_size
  record.save(config=what, batch=batch, dtype=args.dtype, remat=args.remat)
  device = jax.devices()[0]
  step = train_step_bench.Step(config, batch)
  compiled, lower_s, compile_s = step.compile()
  xla_memory = train_step_bench.memory_of(compiled)
  limit = (device.memory_stats() or {}).get('bytes_limit')
  needs_remat = bool(limit and xla_memory.get('peak_estimate', 0) > limit)
  record.save(lower_s=lower_s, compile_s=compile_s, xla_memory=xla_memory,
              device_bytes_limit=limit, needs_remat=needs_remat,
              flops_per_step=train_step_bench.flops_of(compiled))
  if needs_remat and not args.remat:
    print(f"XLA's estimate {xla_memory['peak_estimate']} bytes > the device's {limit}: not run; "
          'device_check runs it again with --remat')
    return
  steps = 3 if args.smoke else 10
  try:
    step_s, loss = train_step_bench.time_step(step, compiled, steps)
  except Exception as e:  # pylint: disable=broad-except
    if 'RESOURCE_EXHAUSTED' not in str(e) or args.remat:
      raise
    print(f'out of device memory ({str(e)[:300]}): device_check runs it again with --remat')
    record.save(needs_remat=True)
    return
  result = dict(flops=record['flops_per_step'], step_s=step_s, images_per_s=batch / step_s,
                batch=batch)
  record.save(step_s=step_s, steps_timed=steps, images_per_s=batch / step_s, loss=loss,
              projection=projection(batch / step_s, config, args.smoke))
  stats = device.memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    record.save(peak_device_bytes=int(stats['peak_bytes_in_use']))
  else:
    record.save(peak_device_bytes_reason=f'{device.platform}: memory_stats() gives no '
                'peak_bytes_in_use (GPU/TPU only); see xla_memory for XLA\'s estimate')
  gpu = train_step_bench.gpu_section(config, result)   # None off a GPU
  if gpu is None:
    record.save(mfu_reason=f'backend {jax.default_backend()}: MFU is only computed against a '
                'GPU\'s peak (benchmarks/train_step.py PEAK_FLOPS)')
  elif gpu['peak_flops'] is None:
    record.save(achieved_flops_per_s=gpu['achieved_flops_per_s'],
                mfu_reason=f'no peak FLOP/s known for {gpu["device_kind"]!r} (PEAK_FLOPS)')
  else:
    record.save(achieved_flops_per_s=gpu['achieved_flops_per_s'], mfu=gpu['mfu'],
                peak_flops=gpu['peak_flops'],
                peak_flops_kind='dense bf16' if args.dtype == 'bfloat16' else
                'dense TF32 (float32 matmuls run as TF32 by default)')


# ------------------------------------------------------------------ inference


def inference_job(args, record):
  config, what = model_config('paper', args.smoke)
  iterations, warmup = (3, 1) if args.smoke else (20, 3)
  record.save(config=what, image_size=config.model.image_size, batch=1, runs={},
              paper_fps=model_info.PAPER_ROWS['eavl']['fps'])
  for dtype in ('float32', 'bfloat16'):
    config.model.dtype = dtype
    start = time.perf_counter()
    shapes = model_info.abstract_params(config.model)
    compiled = model_info.compile_forward(config.model, 1, shapes)
    run = {'compile_s': time.perf_counter() - start, 'fps': None, 'seconds': None,
           'gflops': None}
    flops = train_step_bench.flops_of(compiled)
    run['gflops'] = flops / 1e9
    record.save(runs={**record['runs'], dtype: run})
    speed = model_info.inference_speed(compiled, config.model, 1, iterations, warmup, shapes)
    run.update(fps=speed['images_per_second'], seconds=speed['seconds_per_batch'],
               iterations=iterations, what='the jitted forward (logits) of one image and '
               'expression already on the device; no pre- or post-processing')
    record.save(runs={**record['runs'], dtype: run})


# ------------------------------------------------------------------ dynamic convolution


def dynamic_conv_job(args, record):
  shapes = SMOKE_CONV_SHAPE if args.smoke else {
      name: s for name, s in dynamic_conv_bench.SHAPES.items() if name.startswith('paper')}
  repeats = 3 if args.smoke else 20
  record.save(shape=next(iter(shapes)), repeats=repeats)
  rows = dynamic_conv_bench.measure(shapes, repeats)
  model_forms = [f for f in dynamic_conv.FORMS if f != 'auto']
  best = min((r for r in rows if r['form'] in model_forms), key=lambda r: r['fwd_bwd_ms'])
  backend, now = jax.default_backend(), dynamic_conv.resolve_form('auto')
  verdict = (f"'{best['form']}' (fastest model form in fwd+bwd on {backend}); "
             + (f"'auto' already takes it" if now == best['form'] else
                f"'auto' takes '{now}' now: set FASTEST_FORM['{backend}'] = '{best['form']}' in "
                'eavl_jax/models/dynamic_conv.py'))
  record.save(rows=rows, model_forms=model_forms, auto_resolves_to=now,
              fastest_fwd=min(rows, key=lambda r: r['fwd_ms'])['form'],
              fastest_fwd_bwd=min(rows, key=lambda r: r['fwd_bwd_ms'])['form'],
              recommended_auto_form=best['form'], recommendation=verdict)


# ------------------------------------------------------------------ numerics


def numerics_job(args, record):
  del args   # configs/tiny.py in both modes: it is small everywhere
  config = tiny.get_config()
  model = builder.build_model(config.model)
  cpu, device = jax.devices('cpu')[0], jax.devices()[0]
  batch = train_step_bench.random_batch(config, config.train.global_batch_size)
  with jax.default_device(cpu):   # one set of parameters, made once, on the host
    variables = jax.device_get(jax.jit(lambda k: model.init(
        k, *builder.dummy_inputs(config.model, 1), train=False))(jax.random.PRNGKey(0)))
  record.save(config='configs/tiny.py, float32', batch=config.train.global_batch_size,
              devices=[str(device), str(cpu)], precisions={})

  def logits_and_grad_norm(v, b):   # one program: the logits and the loss's gradient norm
    def loss(params):
      logits = model.apply({**v, 'params': params}, b['image'], b['input_ids'],
                           b['attention_mask'], train=False)['logits']
      return losses.loss_fn(logits, b['mask'], config.loss), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(v['params'])
    return logits, optax.tree.norm(grads)

  run = jax.jit(logits_and_grad_norm)   # traced again under each precision
  for precision in ('default', 'highest'):
    ctx = contextlib.nullcontext() if precision == 'default' else \
        jax.default_matmul_precision(precision)
    out = {}
    with ctx:
      for where, dev in (('device', device), ('cpu', cpu)):
        v, b = jax.device_put((variables, batch), dev)
        logits, norm = run(v, b)
        out[where] = np.asarray(logits, np.float64), float(norm)
    (logits_d, norm_d), (logits_c, norm_c) = out['device'], out['cpu']
    diff = float(np.max(np.abs(logits_d - logits_c)))
    result = dict(logits_max_abs_diff=diff,
                  logits_rel_diff=diff / max(float(np.max(np.abs(logits_c))), 1e-30),
                  logits_max_abs=float(np.max(np.abs(logits_c))),
                  grad_norm_device=norm_d, grad_norm_cpu=norm_c,
                  grad_norm_abs_diff=abs(norm_d - norm_c),
                  grad_norm_rel_diff=abs(norm_d - norm_c) / max(abs(norm_c), 1e-30))
    record.save(precisions={**record['precisions'], precision: result})
  if device.platform == 'cpu':
    record.save(note='no accelerator: both sides ran on the CPU, so the differences say nothing')


JOBS = {'train': train_job, 'inference': inference_job, 'dynamic_conv': dynamic_conv_job,
        'numerics': numerics_job}


def main():
  args = parse_args()
  record = Record(args.out)
  record.save()
  JOBS[args.job](args, record)


if __name__ == '__main__':
  main()
