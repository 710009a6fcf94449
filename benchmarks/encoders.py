"""Our Flax Swin-B and BERT-base against timm's and transformers' PyTorch models, same weights.

  python benchmarks/encoders.py [--batch=2] [--image_size=480] [--seq_len=17] [--repeats=3]
      [--warmup=2] [--torch_threads=N] [--skip=swin|bert] [--small] [--json_out=FILE]

Random weights (nothing is downloaded): timm's `swin_base_patch4_window12_384` built at
--image_size and transformers' `BertModel` from a bert-base `BertConfig` are saved to a temporary
folder and read into the Flax encoders by our loaders (`weights.load_swin`, `weights.load_bert`),
so both frameworks run the same weights; the outputs are compared before timing. Each encoder is
timed forward (inference) and forward+backward (gradient of a scalar of the output with respect to
every parameter), in turn, on the same CPU, at the same batch; dropout / drop-path are off in both.
One core each (per-core efficiency): pin the process, torch to one thread:
  taskset -c 0 python benchmarks/encoders.py --torch_threads=1 ...
(XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" is not enough:
XLA:CPU's matmuls still ran on both cores of the development machine with it.)
--small: a narrow, shallow Swin (window 6) at 192² and a 2-layer BERT of width 128 (a quick check
of the script).
"""
import argparse
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import timm
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # pylint: disable=wrong-import-position
from eavl_jax import weights  # pylint: disable=wrong-import-position
from eavl_jax.models import bert  # pylint: disable=wrong-import-position
from eavl_jax.models import swin  # pylint: disable=wrong-import-position
from eavl_jax.weights import swin as swin_weights  # pylint: disable=wrong-import-position
from safetensors import torch as safetensors_torch  # pylint: disable=wrong-import-position

SWIN_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12)
SWIN_SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=6)
BERT_SMALL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=512)


def swin_pair(image_size, small, folder):
  """-> (timm model, (flax module, params)) with the same weights."""
  sizes = SWIN_SMALL if small else SWIN_B
  if small:
    torch_model = timm.models.swin_transformer.SwinTransformer(
        img_size=image_size, num_classes=0, drop_path_rate=0.0, **sizes)
  else:
    torch_model = timm.create_model('swin_base_patch4_window12_384', pretrained=False,
                                    img_size=image_size, num_classes=0, drop_path_rate=0.0)
  path = os.path.join(folder, 'swin.safetensors')
  safetensors_torch.save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()},
                              path)
  vision = ml_collections.ConfigDict(dict(patch_size=4, mlp_ratio=4.0, drop_path_rate=0.0, **sizes))
  params = weights.load_swin(path, swin_weights.abstract_params(vision))
  flax_model = swin.SwinTransformer(**swin.config_sizes(vision), remat=False)
  return torch_model, (flax_model, params)


def bert_pair(small, folder):
  config = transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   **(BERT_SMALL if small else {}))
  torch_model = transformers.BertModel(config, add_pooling_layer=False)
  path = os.path.join(folder, 'bert')
  torch_model.save_pretrained(path)
  params, hf_config = weights.load_bert(path)
  flax_model = bert.BertModel(**{f: hf_config[f] for f in bert.SIZE_FIELDS}, remat=False)
  return torch_model, (flax_model, params)


def torch_swin_maps(model, images):  # (B, 3, S, S) -> last stage map, no final norm
  return model.layers(model.patch_embed(images))


def time_pair(name, unit, batch, torch_fn, torch_inputs, torch_params, flax_apply, flax_params,
              flax_inputs, repeats, warmup):
  """Forward and forward+backward of both frameworks; -> rows."""
  def torch_fwd():
    with torch.inference_mode():
      torch_fn(*torch_inputs)

  def torch_fwd_bwd():
    for p in torch_params:
      p.grad = None
    torch_fn(*torch_inputs).square().mean().backward()

  jax_fwd = jax.jit(flax_apply)
  jax_grad = jax.jit(jax.grad(lambda p, *x: jnp.mean(jnp.square(flax_apply(p, *x)))))
  rows = []
  for mode, t_fn, j_fn in (('fwd', torch_fwd, jax_fwd), ('fwd+bwd', torch_fwd_bwd, jax_grad)):
    t_s, j_s = common.interleaved_medians(
        [t_fn, lambda: jax.block_until_ready(j_fn(flax_params, *flax_inputs))], repeats, warmup)
    rows.append(dict(model=name, mode=mode, unit=unit, batch=batch, torch_s=t_s, jax_s=j_s,
                     torch_rate=batch / t_s, jax_rate=batch / j_s, jax_over_torch=t_s / j_s))
    print(f'  {name} {mode}: torch {t_s:.3f} s, jax {j_s:.3f} s', flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--image_size', type=int, default=0, help='default 480 (192 with --small)')
  parser.add_argument('--seq_len', type=int, default=17, help='tokens per expression (RefCOCO: 17)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=2, help='untimed calls first (compile)')
  parser.add_argument('--small', action='store_true')
  parser.add_argument('--torch_threads', type=int, default=0, help='default: the cores this process may use')
  parser.add_argument('--skip', default='', help="'swin' or 'bert': leave that encoder out")
  parser.add_argument('--json_out', default='')
  args = parser.parse_args()
  image_size = args.image_size or (192 if args.small else 480)
  torch.set_num_threads(args.torch_threads or len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  machine = common.machine_line(torch)
  print(machine)
  cores = len(os.sched_getaffinity(0))
  print(f'cores this process may use: {cores} of {os.cpu_count()}; jax: XLA:CPU default pool '
        f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); torch: "
        f'set_num_threads({torch.get_num_threads()})')
  rng = np.random.default_rng(0)
  rows, checks = [], {}
  with tempfile.TemporaryDirectory() as folder:
    if args.skip != 'swin':
      torch_model, (flax_model, params) = swin_pair(image_size, args.small, folder)
      images = rng.normal(size=(args.batch, image_size, image_size, 3)).astype(np.float32)
      torch_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
      apply = lambda p, x: flax_model.apply({'params': p}, x)[-1]
      with torch.no_grad():
        want = torch_swin_maps(torch_model.eval(), torch_images).numpy()
      checks['swin_max_abs_diff'] = float(np.abs(np.asarray(jax.jit(apply)(params, images))
                                                 - want).max())
      print(f'Swin {image_size}²: last stage map {want.shape}, max |jax - torch| = '
            f'{checks["swin_max_abs_diff"]:.2e}', flush=True)
      name = 'Swin (small)' if args.small else 'Swin-B w12'
      rows += time_pair(f'{name} {image_size}²', 'images/s', args.batch,
                        lambda x: torch_swin_maps(torch_model, x), (torch_images,),
                        list(torch_model.parameters()), apply, params, (images,), args.repeats,
                        args.warmup)
      del torch_model, params
    if args.skip != 'bert':
      torch_model, (flax_model, params) = bert_pair(args.small, folder)
      ids = rng.integers(1000, 30000, size=(args.batch, args.seq_len)).astype(np.int32)
      mask = np.ones_like(ids)
      mask[0, args.seq_len // 2:] = 0  # one padded expression
      t_ids, t_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
      apply = lambda p, i, m: flax_model.apply({'params': p}, i, m)
      torch_fn = lambda i, m: torch_model(input_ids=i, attention_mask=m).last_hidden_state
      with torch.no_grad():
        want = torch_fn(t_ids, t_mask).numpy()
      got = np.asarray(jax.jit(apply)(params, ids, mask))
      checks['bert_max_abs_diff'] = float(np.abs(got - want)[mask.astype(bool)].max())
      print(f'BERT L={args.seq_len}: max |jax - torch| over real tokens = '
            f'{checks["bert_max_abs_diff"]:.2e} (torch attention: '
            f'{torch_model.config._attn_implementation})',  # pylint: disable=protected-access
            flush=True)
      name = 'BERT (small)' if args.small else 'BERT-base'
      rows += time_pair(f'{name} L={args.seq_len}', 'sequences/s', args.batch, torch_fn,
                        (t_ids, t_mask), list(torch_model.parameters()), apply, params,
                        (ids, mask), args.repeats, args.warmup)

  print(f'\nbatch {args.batch}, median of {args.repeats} (torch and jax alternating) after '
        f'{args.warmup} warm-up(s); '
        'rate = batch / median step time')
  print(f'{"model":<24} {"pass":<8} {"unit":<12} {"torch":>9} {"jax":>9} {"jax/torch":>10}')
  for r in rows:
    print(f'{r["model"]:<24} {r["mode"]:<8} {r["unit"]:<12} {r["torch_rate"]:>9.2f} '
          f'{r["jax_rate"]:>9.2f} {r["jax_over_torch"]:>10.2f}')
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump({'machine': machine, 'args': vars(args), 'image_size': image_size,
                 'checks': checks, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
