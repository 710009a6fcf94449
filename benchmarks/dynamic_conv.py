"""The per-query dynamic convolution (eq. 12) in each form, forward and forward+backward.

  python benchmarks/dynamic_conv.py [--json_out=FILE] [--repeats=N]

Forms: the vmapped `lax.conv_general_dilated` (the reference; XLA turns it into one grouped conv),
an explicit grouped convolution (batch folded into channels, feature_group_count=B), and the shifted
matmul form the model uses where it is fastest. Prints times and each form's ratio to the fastest.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from eavl_jax.models import dynamic_conv

SHAPES = {  # name: (B, H, W, C_p, N_q)
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
         'shifted_matmul': dynamic_conv.shifted_matmul}


def time_fn(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--json_out', default='')
  args = parser.parse_args()

  results = []
  for shape_name, (b, h, w, c, n) in SHAPES.items():
    rng = np.random.default_rng(0)
    inputs = (jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32),
              jnp.asarray(rng.normal(size=(b, n, 3, 3, c)) * 0.05, jnp.float32),
              jnp.asarray(rng.normal(size=(b, n)), jnp.float32))
    reference = np.asarray(dynamic_conv.vmap_conv(*inputs))
    for form, fn in FORMS.items():
      np.testing.assert_allclose(np.asarray(jax.jit(fn)(*inputs)), reference, rtol=2e-3, atol=2e-3)
      fwd = jax.jit(fn)
      fwd_bwd = jax.jit(jax.grad(lambda x, k, c, fn=fn: jnp.sum(fn(x, k, c) ** 2), argnums=(0, 1, 2)))
      results.append(dict(shape=shape_name, form=form, backend=jax.default_backend(),
                          fwd_ms=1e3 * time_fn(fwd, inputs, args.repeats),
                          fwd_bwd_ms=1e3 * time_fn(fwd_bwd, inputs, args.repeats)))

  print(f'backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); model uses '
        f"'{dynamic_conv.resolve_form('auto')}' (model.aligner.conv_impl='auto')")
  print(f'{"shape":<36} {"form":<16} {"fwd ms":>9} {"x best":>7} {"fwd+bwd ms":>11} {"x best":>7}')
  for shape_name in SHAPES:
    rows = [r for r in results if r['shape'] == shape_name]
    best_f = min(r['fwd_ms'] for r in rows)
    best_fb = min(r['fwd_bwd_ms'] for r in rows)
    for r in rows:
      r['fwd_ratio'], r['fwd_bwd_ratio'] = r['fwd_ms'] / best_f, r['fwd_bwd_ms'] / best_fb
      print(f'{shape_name:<36} {r["form"]:<16} {r["fwd_ms"]:>9.2f} {r["fwd_ratio"]:>7.2f} '
            f'{r["fwd_bwd_ms"]:>11.2f} {r["fwd_bwd_ratio"]:>7.2f}')
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
