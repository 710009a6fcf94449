"""Bilinear resizes of logit maps, the two conventions of the project (docs/evaluation.md):

  half-pixel centres (torch's F.interpolate(mode='bilinear', align_corners=False), =
    jax.image.resize 'linear'): EAVL's loss at the input size, protocol 'original', predict.py;
  corners aligned (align_corners=True): output i samples the input at i (n_in - 1) / (n_out - 1);
    LAVT's model ends with it (lib/_utils.py), so LAVT's test (protocol 'lavt') and LAVT's loss
    at the input size use it.

`align_corners` computes what torch's CPU kernel computes, in its order: the source position
scale * i with scale = (n_in - 1) / (n_out - 1) in float32, the lower index its integer part,
the weights lambda1 = position - index and lambda0 = 1 - lambda1, and per pixel
  out = lambda0_h (lambda0_w x00 + lambda1_w x01) + lambda1_h (lambda0_w x10 + lambda1_w x11).
Gathers and elementwise products only (no matrix product whose precision a backend may lower).
"""
import jax
import jax.numpy as jnp
import numpy as np


def align_corners_taps(size_out, size_in):
  """1D taps of align_corners=True -> (low, high) int32 (size_out,), (w_low, w_high) float32."""
  scale = (np.float32(size_in - 1) / np.float32(size_out - 1) if size_out > 1
           else np.float32(0))
  pos = (scale * np.arange(size_out, dtype=np.float32)).astype(np.float32)  # source positions
  low = pos.astype(np.int64)                                                # >= 0: truncation
  high = low + (low < size_in - 1)
  w_high = np.clip(pos - low.astype(np.float32), 0, 1).astype(np.float32)
  w_low = (np.float32(1) - w_high).astype(np.float32)
  return low.astype(np.int32), high.astype(np.int32), w_low, w_high


def align_corners(x, height, width):
  """(..., h, w) -> (..., height, width) float32: bilinear, corners aligned (torch's
  align_corners=True, computed as its kernel does; see the module docstring)."""
  x = jnp.asarray(x, jnp.float32)
  r0, r1, a0, a1 = align_corners_taps(height, x.shape[-2])
  c0, c1, b0, b1 = align_corners_taps(width, x.shape[-1])
  rows = lambda idx: jnp.take(x, idx, axis=-2)                              # (..., H, w)
  cols = lambda y, idx: jnp.take(y, idx, axis=-1)                           # (..., H, W)
  b0, b1 = jnp.asarray(b0), jnp.asarray(b1)
  inner = lambda y: cols(y, c0) * b0 + cols(y, c1) * b1                     # along the width
  a0, a1 = jnp.asarray(a0)[:, None], jnp.asarray(a1)[:, None]
  return inner(rows(r0)) * a0 + inner(rows(r1)) * a1


def half_pixel(x, height, width):
  """(..., h, w) -> (..., height, width): bilinear, half-pixel centres, edges clamped
  (jax.image.resize; torch's align_corners=False)."""
  return jax.image.resize(x, x.shape[:-2] + (height, width), 'linear', antialias=False)


def logits_to(x, height, width, corners_aligned):
  """The upsampling of the logits (..., h, w) -> (..., height, width) by either convention."""
  return (align_corners if corners_aligned else half_pixel)(x, height, width)
