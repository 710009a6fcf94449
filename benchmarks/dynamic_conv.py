"""The per-query dynamic convolution (eq. 12) in each form, forward and forward+backward.

  python benchmarks/dynamic_conv.py [--json_out=FILE] [--repeats=N]

Forms: the vmapped `lax.conv_general_dilated` (the reference; XLA turns it into one grouped conv),
an explicit grouped convolution (batch folded into channels, feature_group_count=B), the shifted
matmul form with its custom backward, and the same forward differentiated by JAX (the backward it
replaced). Prints times and each form's ratio to the fastest, then the form the model uses
(`model.aligner.conv_impl` of configs/base.py, resolved on this backend) against the goal: within
1.1x of the fastest form measured on the backend.
"""
import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # pylint: disable=wrong-import-position
from configs import base  # pylint: disable=wrong-import-position
from eavl_jax.models import dynamic_conv  # pylint: disable=wrong-import-position

SHAPES = {  # name: (B, H, W, C_p, N_q); --shapes picks them by their first word
    'paper (B=4, 120², C_p=256, N_q=24)': (4, 120, 120, 256, 24),
    'small (B=4, 32², C_p=32, N_q=8)': (4, 32, 32, 32, 8),
}


def grouped_conv(features, kernels, bias):
  """Batch folded into channels: one conv with feature_group_count = B (what the vmap becomes)."""
  b, h, w, c = features.shape
  n = kernels.shape[1]
  x = features.transpose(1, 2, 0, 3).reshape(1, h, w, b * c)     # (1, H, W, B*C)
  k = kernels.transpose(2, 3, 4, 0, 1).reshape(3, 3, c, b * n)   # (3, 3, C, B*N), grouped by b
  y = lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                               feature_group_count=b)             # (1, H, W, B*N)
  return y[0].reshape(h, w, b, n).transpose(2, 3, 0, 1) + bias[:, :, None, None]


FORMS = {'vmap_conv': dynamic_conv.vmap_conv, 'grouped_conv': grouped_conv,
         'shifted_matmul': dynamic_conv.shifted_matmul,
         # the same forward, backward by JAX's autodiff (before the custom VJP)
         'shifted_autodiff': dynamic_conv._shifted_matmul_forward}  # pylint: disable=protected-access
GOAL = 1.1  # the model's form within this factor of the fastest


def measure(shapes, repeats):
  """-> rows {shape, form, backend, fwd_ms, fwd_bwd_ms, fwd_ratio, fwd_bwd_ratio} of every form of
  FORMS at each of `shapes` ({name: (B, H, W, C_p, N_q)}); ratio: time / the fastest form's."""
  results = []
  for shape_name, (b, h, w, c, n) in shapes.items():
    rng = np.random.default_rng(0)
    inputs = (jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32),
              jnp.asarray(rng.normal(size=(b, n, 3, 3, c)) * 0.05, jnp.float32),
              jnp.asarray(rng.normal(size=(b, n)), jnp.float32))
    reference = np.asarray(dynamic_conv.vmap_conv(*inputs))
    fwd_calls, fwd_bwd_calls = [], []
    for form, fn in FORMS.items():
      np.testing.assert_allclose(np.asarray(jax.jit(fn)(*inputs)), reference, rtol=2e-3, atol=2e-3)
      fwd = jax.jit(fn)
      fwd_bwd = jax.jit(jax.grad(lambda x, k, c, fn=fn: jnp.sum(fn(x, k, c) ** 2), argnums=(0, 1, 2)))
      fwd_calls.append(lambda f=fwd: jax.block_until_ready(f(*inputs)))
      fwd_bwd_calls.append(lambda f=fwd_bwd: jax.block_until_ready(f(*inputs)))
    # the forms in turn within each repeat, so that a change of load on the machine hits all alike;
    # forward passes apart from backward ones, so that no short call follows a long one
    fwd_s = common.interleaved_medians(fwd_calls, repeats, warmup=1)
    fwd_bwd_s = common.interleaved_medians(fwd_bwd_calls, repeats, warmup=1)
    rows = [dict(shape=shape_name, form=form, backend=jax.default_backend(),
                 fwd_ms=1e3 * fwd_s[i], fwd_bwd_ms=1e3 * fwd_bwd_s[i])
            for i, form in enumerate(FORMS)]
    best_f, best_fb = min(fwd_s), min(fwd_bwd_s)
    for i, r in enumerate(rows):
      r['fwd_ratio'], r['fwd_bwd_ratio'] = fwd_s[i] / best_f, fwd_bwd_s[i] / best_fb
    results += rows
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--shapes', default='paper,small', help='comma-separated: paper, small')
  parser.add_argument('--json_out', default='')
  args = parser.parse_args()
  wanted = args.shapes.split(',')
  unknown = set(wanted) - {name.split()[0] for name in SHAPES}
  if unknown:
    parser.error(f'--shapes: unknown {sorted(unknown)}; known: paper, small')
  shapes = {name: shape for name, shape in SHAPES.items() if name.split()[0] in wanted}

  results = measure(shapes, args.repeats)

  conv_impl = base.get_config().model.aligner.conv_impl
  used = dynamic_conv.resolve_form(conv_impl)
  print(common.machine_line())
  print(f'median of {args.repeats} after one warm-up; x best = time / fastest form of the row\'s '
        f'shape; model: model.aligner.conv_impl={conv_impl!r} -> {used!r}')
  print(f'{"shape":<36} {"form":<18} {"fwd ms":>9} {"x best":>7} {"fwd+bwd ms":>11} {"x best":>7} '
        f'{"model":>6}')
  summary = []
  for shape_name in shapes:
    rows = [r for r in results if r['shape'] == shape_name]
    for r in rows:
      r['used_by_model'] = r['form'] == used
      print(f'{shape_name:<36} {r["form"]:<18} {r["fwd_ms"]:>9.2f} {r["fwd_ratio"]:>7.2f} '
            f'{r["fwd_bwd_ms"]:>11.2f} {r["fwd_bwd_ratio"]:>7.2f} '
            f'{"<-" if r["used_by_model"] else "":>6}')
    mine = next(r for r in rows if r['used_by_model'])
    summary.append(dict(shape=shape_name, backend=jax.default_backend(), form=used,
                        fwd_ratio=mine['fwd_ratio'], fwd_bwd_ratio=mine['fwd_bwd_ratio'],
                        meets_goal=bool(max(mine['fwd_ratio'], mine['fwd_bwd_ratio']) <= GOAL)))
  print(f'\nas used by the model (goal: within {GOAL}x of the fastest form on '
        f'{jax.default_backend()}):')
  print(f'{"shape":<36} {"form":<18} {"fwd x best":>11} {"fwd+bwd x best":>15} {"goal":>5}')
  for r in summary:
    print(f'{r["shape"]:<36} {r["form"]:<18} {r["fwd_ratio"]:>11.2f} {r["fwd_bwd_ratio"]:>15.2f} '
          f'{"met" if r["meets_goal"] else "MISSED":>5}')
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump({'machine': common.machine_line(), 'rows': results, 'model': summary}, f,
                indent=1)


if __name__ == '__main__':
  main()
