"""The CPU-friendly forms of dense layers, GELU and the patch embedding equal Flax's own."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eavl_jax.models import layers
from eavl_jax.models import swin


def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _assert_same_params_and_grads(ours, theirs, x):
  params = theirs.init(jax.random.PRNGKey(0), x)
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(0), x))
          == jax.tree.map(jnp.shape, params))
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), atol=1e-5)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  g_theirs = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
               g_ours, g_theirs)


@pytest.mark.parametrize('shape', [(3, 5, 7, 8), (4, 8), (2, 6, 8)])
def test_dense_equals_flax_dense(shape):
  _assert_same_params_and_grads(layers.Dense(6), nn.Dense(6), _normal(shape))


def test_attention_equals_flax_attention():
  x = _normal((2, 9, 16))

  class Wrap(nn.Module):
    cls: type

    @nn.compact
    def __call__(self, x):
      return self.cls(num_heads=4, name='attn')(x, x)
  _assert_same_params_and_grads(Wrap(layers.MultiHeadDotProductAttention),
                                Wrap(nn.MultiHeadDotProductAttention), x)


def test_matmul_dot_general_falls_back_for_other_contractions():
  a, b = _normal((2, 3, 4)), _normal((2, 4, 5), 1)
  dims = (((2,), (1,)), ((0,), (0,)))  # a batched matmul: not a dense layer's contraction
  np.testing.assert_allclose(layers.matmul_dot_general(a, b, dims),
                             jax.lax.dot_general(a, b, dims), atol=1e-6)


def test_gelu_equals_exact_gelu():
  x = jnp.linspace(-10.0, 10.0, 20001)
  np.testing.assert_allclose(layers.gelu(x), nn.gelu(x, approximate=False), atol=2e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(layers.gelu))(x),
                             jax.vmap(jax.grad(lambda t: nn.gelu(t, approximate=False)))(x),
                             atol=2e-6)


def test_patch_projection_equals_strided_conv():
  images = _normal((2, 16, 12, 3))
  _assert_same_params_and_grads(swin.PatchProjection(8, 4),
                                nn.Conv(8, (4, 4), strides=(4, 4), padding='VALID'), images)


def test_window_bias_gradient_equals_autodiff():
  logits, bias = _normal((6, 2, 5, 5)), _normal((2, 5, 5), 1)
  weights = _normal((6, 2, 5, 5), 2)
  ours = jax.grad(lambda l, b: jnp.sum(jnp.sin(swin.add_window_bias(l, b)) * weights),
                  argnums=(0, 1))(logits, bias)
  plain = jax.grad(lambda l, b: jnp.sum(jnp.sin(l + b[None]) * weights), argnums=(0, 1))(
      logits, bias)
  np.testing.assert_allclose(ours[0], plain[0], atol=1e-6)
  np.testing.assert_allclose(ours[1], plain[1], atol=1e-5)
