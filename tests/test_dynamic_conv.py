"""The per-query dynamic convolution (eq. 12): both forms equal a plain loop, one conv in the HLO."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eavl_jax.models import dynamic_conv


def loop_reference(features, kernels, bias):
  """Plain numpy: for every sample b and query n, a 3x3 'same' correlation plus bias."""
  b, h, w, c = features.shape
  n = kernels.shape[1]
  padded = np.pad(features, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((b, n, h, w), np.float64)
  for s in range(b):
    for q in range(n):
      for i in range(3):
        for j in range(3):
          out[s, q] += padded[s, i:i + h, j:j + w, :] @ kernels[s, q, i, j, :]
      out[s, q] += bias[s, q]
  return out


def random_inputs(seed, b, n, h=7, w=5, c=6):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, h, w, c)).astype(np.float32),
          rng.normal(size=(b, n, 3, 3, c)).astype(np.float32),
          rng.normal(size=(b, n)).astype(np.float32))


@pytest.mark.parametrize('form', ['vmap_conv', 'shifted_matmul'])
@pytest.mark.parametrize('b,n', [(1, 1), (2, 3), (3, 8), (4, 24)])
def test_forms_equal_numpy_loop(form, b, n):
  features, kernels, bias = random_inputs(b * 100 + n, b, n)
  got = dynamic_conv.dynamic_conv(features, kernels, bias, form)
  np.testing.assert_allclose(np.asarray(got), loop_reference(features, kernels, bias),
                             atol=1e-5, rtol=1e-5)


def test_forms_have_equal_gradients():
  features, kernels, bias = random_inputs(0, 2, 3)
  grads = {}
  for form in ('vmap_conv', 'shifted_matmul'):
    f = lambda x, k, c: jnp.sum(jnp.sin(dynamic_conv.dynamic_conv(x, k, c, form)))
    grads[form] = jax.grad(f, argnums=(0, 1, 2))(features, kernels, bias)
  for a, b in zip(grads['vmap_conv'], grads['shifted_matmul']):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_vmap_form_compiles_to_one_grouped_convolution():
  b, n = 4, 24
  features, kernels, bias = random_inputs(1, b, n, h=12, w=12, c=16)
  hlo = jax.jit(dynamic_conv.vmap_conv).lower(features, kernels, bias).compile().as_text()
  convolutions = re.findall(r'= \S+ convolution\(.*', hlo)
  assert len(convolutions) == 1, convolutions
  assert f'feature_group_count={b}' in convolutions[0]
  assert 'while' not in hlo  # no per-sample loop


def test_auto_resolves_to_a_known_form_and_bad_names_fail():
  assert dynamic_conv.resolve_form('auto') in ('vmap_conv', 'shifted_matmul')
  assert dynamic_conv.resolve_form('vmap_conv') == 'vmap_conv'
  with pytest.raises(ValueError, match='conv_impl.*im2col'):
    dynamic_conv.resolve_form('im2col')
