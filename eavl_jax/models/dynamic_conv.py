"""The per-query dynamic 3x3 convolution of eq. 12, in two equal forms.

`vmap_conv` is the reference: one `lax.conv_general_dilated` per sample, `jax.vmap`-ed over the batch,
all N_q kernels of a sample the O axis of one HWIO kernel; XLA batches it into ONE grouped convolution
(feature_group_count = B). `shifted_matmul` computes the same sums as one batched matmul of F_p with
all nine taps of every kernel, then adds the nine tap maps shifted into place. XLA:CPU runs the grouped
convolution an order of magnitude slower than the matmul form (benchmarks/dynamic_conv.py), so 'auto'
takes the form measured fastest on each backend. The matmul form has its own backward (a custom VJP):
the output gradient is shifted into the nine tap positions once, in (B, H, W, 9, N) layout, and
both input gradients are one batched matmul each with it; the automatic derivative of the forward
builds the same sums through transposed (B, 9, H, W, N) tap maps and ran 3x slower on XLA:CPU.
"""
import jax
import jax.numpy as jnp
from jax import lax

# Fastest form per backend, from benchmarks/dynamic_conv.py; a backend not measured keeps the reference.
FASTEST_FORM = {'cpu': 'shifted_matmul'}
FORMS = ('vmap_conv', 'shifted_matmul', 'auto')


def resolve_form(form: str) -> str:
  if form not in FORMS:
    raise ValueError(f'model.aligner.conv_impl must be one of {FORMS}, got {form!r}')
  if form == 'auto':
    return FASTEST_FORM.get(jax.default_backend(), 'vmap_conv')
  return form


def vmap_conv(features, kernels, bias):
  """features (B,H,W,C), kernels (B,N,3,3,C), bias (B,N) -> (B,N,H,W)."""
  def one_sample(x, k, b):                                   # x (H,W,C), k (N,3,3,C), b (N,)
    hwio = k.transpose(1, 2, 3, 0)                           # (3, 3, C, N)
    y = lax.conv_general_dilated(
        x[None], hwio, window_strides=(1, 1), padding='SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))          # (1, H, W, N)
    return y[0] + b
  out = jax.vmap(one_sample)(features, kernels, bias)        # (B, H, W, N)
  return out.transpose(0, 3, 1, 2)


@jax.custom_vjp
def shifted_matmul(features, kernels, bias):
  """Same contract as `vmap_conv`: y[h,w] = sum over taps (i,j) of x[h+i-1, w+j-1] . k[i,j]."""
  return _shifted_matmul_forward(features, kernels, bias)


def _shifted_matmul_forward(features, kernels, bias):
  b, h, w, c = features.shape
  n = kernels.shape[1]
  taps = kernels.reshape(b, n, 9, c)                         # tap t = 3*i + j
  tap_maps = jnp.einsum('bhwc,bntc->bthwn', features, taps)  # (B, 9, H, W, N)
  tap_maps = jnp.pad(tap_maps, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
  out = bias[:, None, None, :].astype(tap_maps.dtype)
  for i in range(3):
    for j in range(3):
      out = out + tap_maps[:, 3 * i + j, i:i + h, j:j + w]   # shift tap (i,j) into place
  return out.transpose(0, 3, 1, 2)                           # (B, N, H, W)


def _shifted_output_grad(grad, height, width):
  """grad (B,H,W,N) -> (B,H,W,9,N): tap t = 3*i + j holds grad[h-i+1, w-j+1] (zero outside), the
  outputs that x[h, w] reached through tap (i, j)."""
  padded = jnp.pad(grad, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.stack([padded[:, 2 - i:2 - i + height, 2 - j:2 - j + width]
                    for i in range(3) for j in range(3)], axis=3)


def _shifted_matmul_fwd(features, kernels, bias):
  return _shifted_matmul_forward(features, kernels, bias), (features, kernels, bias)


def _shifted_matmul_bwd(residuals, grad):                   # grad (B, N, H, W)
  features, kernels, bias = residuals
  b, h, w, c = features.shape
  n = kernels.shape[1]
  taps = kernels.reshape(b, n, 9, c)
  shifted = _shifted_output_grad(grad.transpose(0, 2, 3, 1), h, w)        # (B, H, W, 9, N)
  d_features = jnp.einsum('bhwtn,bntc->bhwc', shifted, taps.astype(shifted.dtype))
  d_taps = jnp.einsum('bhwtn,bhwc->bntc', shifted, features.astype(shifted.dtype))
  d_bias = grad.sum(axis=(2, 3))                                          # (B, N)
  return (d_features.astype(features.dtype), d_taps.reshape(kernels.shape).astype(kernels.dtype),
          d_bias.astype(bias.dtype))


shifted_matmul.defvjp(_shifted_matmul_fwd, _shifted_matmul_bwd)


def dynamic_conv(features, kernels, bias, form='auto'):
  """Dispatches to the form named by `model.aligner.conv_impl`."""
  return {'vmap_conv': vmap_conv, 'shifted_matmul': shifted_matmul}[resolve_form(form)](
      features, kernels, bias)
