"""Small building blocks shared by the modules."""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn


def matmul_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                       **kwargs):
  """`lax.dot_general` for dense layers, as one 2D matmul where the contraction allows it.

  A Dense on (B, H, W, C) contracts one axis of a 4D array; its weight gradient then contracts
  B, H and W together, which XLA:CPU runs several times slower than the same product on the
  flattened (B*H*W, C) rows (docs/performance.md). When the contracted axes
  are the trailing axes of `lhs` and the leading axes of `rhs` (every Dense / DenseGeneral
  projection), both are reshaped to 2D around the product; the result is identical.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n = len(lhs_contract)
  if (lhs_batch or rhs_batch or tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim))
      or tuple(rhs_contract) != tuple(range(n))):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  rows, inner, cols = lhs.shape[:lhs.ndim - n], rhs.shape[:n], rhs.shape[n:]
  k = int(np.prod(inner))
  out = jax.lax.dot_general(lhs.reshape(-1, k), rhs.reshape(k, -1), (((1,), (0,)), ((), ())),
                            precision=precision, preferred_element_type=preferred_element_type,
                            **kwargs)
  return out.reshape(rows + cols)


class Dense(nn.Dense):
  """`nn.Dense` (same parameters, same result) computed as a 2D matmul: `matmul_dot_general`."""
  dot_general: Any = matmul_dot_general


class MultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
  """`nn.MultiHeadDotProductAttention` with its projections as 2D matmuls."""
  qkv_dot_general: Any = matmul_dot_general
  out_dot_general: Any = matmul_dot_general


def gelu(x):
  """Exact (erf) GELU, as torch.nn.GELU() and BERT's 'gelu'.

  Written with erf: `nn.gelu(approximate=False)` uses erfc, which XLA:CPU evaluates several
  times slower; the two agree to 1e-6.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(2 ** -0.5, x.dtype)))


def upsample2x(x):
  """Bilinear 2x upsampling `Up(.)` of eq. 2, 6 and 11.  (B, H, W, C) -> (B, 2H, 2W, C)."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), method='bilinear')


def coord_features(batch, height, width, dtype):
  """F_coord of eq. 5: x and y coordinates in [-1, 1].  (B, H, W, 2)."""
  ys = jnp.linspace(-1.0, 1.0, height, dtype=dtype)
  xs = jnp.linspace(-1.0, 1.0, width, dtype=dtype)
  grid = jnp.stack(jnp.meshgrid(xs, ys, indexing='xy'), axis=-1)  # (H, W, 2): (x, y)
  return jnp.broadcast_to(grid, (batch, height, width, 2))


def sine_positions_2d(height, width, dim, temperature=10000.0):
  """DETR-style 2D sine position embedding, half the channels for y, half for x.  (H*W, dim)."""
  if dim % 4:
    raise ValueError(f'model.hidden_dim must be a multiple of 4 for 2D sine positions, got {dim}')
  quarter = dim // 4
  freqs = temperature ** (-jnp.arange(quarter, dtype=jnp.float32) / quarter)  # (dim/4,)
  ys = jnp.arange(height, dtype=jnp.float32)[:, None] * freqs  # (H, dim/4)
  xs = jnp.arange(width, dtype=jnp.float32)[:, None] * freqs  # (W, dim/4)
  y_emb = jnp.concatenate([jnp.sin(ys), jnp.cos(ys)], axis=-1)  # (H, dim/2)
  x_emb = jnp.concatenate([jnp.sin(xs), jnp.cos(xs)], axis=-1)  # (W, dim/2)
  pos = jnp.concatenate([
      jnp.broadcast_to(y_emb[:, None], (height, width, dim // 2)),
      jnp.broadcast_to(x_emb[None, :], (height, width, dim // 2))], axis=-1)
  return pos.reshape(height * width, dim)


HEAD_NORMS = ('none', 'layer', 'batch')


class Norm(nn.Module):
  """The head's normalisation (`model.head_norm`) before a ReLU: none, a per-sample LayerNorm, or
  a per-channel BatchNorm.

  BatchNorm's statistics are taken over every axis but the channels of the *global* batch: under
  jit the batch axis is one logical array however it is sharded, so 1 and 8 devices compute the
  same numbers. `mask` (broadcastable to x, 1 = counted) leaves padding words out of them. In
  training the running averages (collection 'batch_stats', momentum 0.9 per step) are updated; in
  evaluation they are used instead of the batch's. `open_at_init`: scale 0 and bias 1, so that the
  output is 1 everywhere at initialisation.
  """
  kind: str                   # `model.head_norm`
  dtype: jnp.dtype = jnp.float32
  open_at_init: bool = False

  @nn.compact
  def __call__(self, x, train=False, mask=None):
    affine = {}
    if self.open_at_init:
      affine = dict(scale_init=nn.initializers.zeros, bias_init=nn.initializers.ones)
    if self.kind == 'layer':
      return nn.LayerNorm(dtype=self.dtype, **affine)(x)
    if self.kind == 'batch':
      if mask is not None:
        mask = jnp.broadcast_to(mask, x.shape) > 0
      return nn.BatchNorm(use_running_average=not train, momentum=0.9, use_fast_variance=False,
                          dtype=self.dtype, **affine)(x, mask=mask)
    return x


class ProjectReLU(nn.Module):
  """σ(X W) of eq. 2, 3, 6, 8-10: a Dense (1x1 conv), the head's norm (`Norm`) and a ReLU.

  open_at_init (the gates of eq. 2 and 8, `model.gates_open_at_init`): the projection starts at 1
  for every input (zero kernel and unit bias, or the norm's zero scale and unit bias), so the
  gated product starts as the ungated features and the gate is learned from there.
  """
  features: int
  norm: str                   # `model.head_norm` (Norm's kind)
  dtype: jnp.dtype = jnp.float32
  open_at_init: bool = False

  @nn.compact
  def __call__(self, x, train=False, mask=None):
    init = {}
    if self.open_at_init and self.norm == 'none':
      init = dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.ones)
    x = Dense(self.features, dtype=self.dtype, **init)(x)
    x = Norm(self.norm, self.dtype, self.open_at_init and self.norm != 'none')(x, train, mask)
    return nn.relu(x)


def check_inputs(m, image, input_ids, attention_mask, refs_per_image):
  """ValueError naming the mismatch between a model's inputs and its config `m` (EAVL, LAVT)."""
  s = m.image_size
  if image.ndim != 4 or image.shape[1:] != (s, s, 3):
    raise ValueError(f'image has shape {tuple(image.shape)}; model.image_size={s} needs '
                     f'(B, {s}, {s}, 3)')
  if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
    raise ValueError(f'input_ids {tuple(input_ids.shape)} and attention_mask '
                     f'{tuple(attention_mask.shape)} must both be (B, L)')
  if refs_per_image < 1 or input_ids.shape[0] != image.shape[0] * refs_per_image:
    raise ValueError(f'batch sizes do not match: image has {image.shape[0]}, input_ids has '
                     f'{input_ids.shape[0]}, refs_per_image={refs_per_image} expressions per '
                     f'image')
  if input_ids.shape[1] > m.text_encoder.max_position_embeddings:
    raise ValueError(f'input_ids has {input_ids.shape[1]} tokens, more than '
                     f'model.text_encoder.max_position_embeddings='
                     f'{m.text_encoder.max_position_embeddings}')
