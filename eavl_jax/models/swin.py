"""Swin Transformer backbone (the vision encoder) and the attention pooling of eq. 1.

The forward pass follows the installed timm 1.0 `SwinTransformer` exactly, so that the released
weights give the same stage maps:
- stage i > 0 starts with patch merging (timm's layout; the official release has it at the end of
  stage i - 1, the loader moves it);
- a block whose map is not larger than the window uses a window the size of the map and no shift
  (LAVT's backbone pads such a map up to the window and keeps the shift and its mask:
  `pad_small_maps=True`);
- a shifted block rolls the map first, then pads it at the bottom/right to a multiple of the window,
  and builds the shift mask on the padded size (timm's order; Hugging Face, mmseg and LAVT pad
  before rolling: `pad_before_shift=True`);
- the stage outputs are returned raw: no norm of our own, and not the classifier's final `norm`.

Parameter names follow timm's (patch_embed/proj, layers_i/downsample/reduction,
layers_i/blocks_j/attn/qkv, attn/relative_position_bias_table, norm1, mlp/fc1, ...), so a checkpoint
maps onto them one to one. Relative position indices and shift masks are numpy constants.
"""
from typing import Any, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from eavl_jax.models import layers

_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, used by timm's Swin
_MASK_VALUE = -100.0  # what timm adds to attention logits across shift regions


def clamp_window(size, window_size, shift_size):
  """timm's rule: a map not larger than the window gets a window of its size and no shift."""
  window = tuple(min(s, window_size) for s in size)
  shift = tuple(0 if s <= window_size else shift_size for s in size)
  return window, shift


def relative_position_index(window, table_window):
  """Index into a ((2T-1)^2, heads) table for every pair of tokens of a window.  (wh*ww, wh*ww).

  T = table_window is the window the table was made for; a smaller (clamped) window reads the
  central part of the table (its offsets are a subset of the table's).
  """
  wh, ww = window
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing='ij')).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N), offsets in (-(w-1), w-1)
  return (rel[0] + table_window - 1) * (2 * table_window - 1) + (rel[1] + table_window - 1)


def shift_mask(padded_size, window, shift):
  """0 / -100 additive mask of shifted-window attention.  (num_windows, wh*ww, wh*ww).

  Regions are labelled on the padded map with the slices timm uses (python slicing semantics).
  """
  hp, wp = padded_size
  (wh, ww), (sh, sw) = window, shift
  labels = np.zeros((hp, wp), np.float32)
  count = 0
  for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
    for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
      labels[hs, ws] = count
      count += 1
  windows = labels.reshape(hp // wh, wh, wp // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
  diff = windows[:, None, :] - windows[:, :, None]
  return np.where(diff != 0, _MASK_VALUE, 0.0).astype(np.float32)


def window_partition(x, window):
  """(B, H, W, C) -> (B * nW, wh * ww, C), windows in row-major order."""
  b, h, w, c = x.shape
  wh, ww = window
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, wh * ww, c)


def window_reverse(windows, window, batch, height, width):
  """(B * nW, wh * ww, C) -> (B, H, W, C)."""
  wh, ww = window
  c = windows.shape[-1]
  x = windows.reshape(batch, height // wh, width // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, height, width, c)


@jax.custom_vjp
def add_window_bias(logits, bias):
  """logits + bias[None]: (B*nW, h, N, N) + (h, N, N).

  Its gradient w.r.t. the bias sums the logits' gradient over the B*nW windows. XLA:CPU runs that
  sum over the leading axis as a reduction ~35x slower than the same sum written as a
  (1, B*nW) x (B*nW, h*N*N) matrix product, which is what the backward below does (Swin-B at 480²:
  ~40 ms per stage-1 block; docs/performance.md).
  """
  return logits + bias[None].astype(logits.dtype)


def _add_window_bias_fwd(logits, bias):
  return add_window_bias(logits, bias), jnp.zeros((0,), bias.dtype)  # keeps the bias dtype


def _add_window_bias_bwd(bias_dtype_carrier, g):
  windows = g.shape[0]
  ones = jnp.ones((1, windows), g.dtype)
  d_bias = jnp.dot(ones, g.reshape(windows, -1), preferred_element_type=jnp.float32)
  return g, d_bias.reshape(g.shape[1:]).astype(bias_dtype_carrier.dtype)


add_window_bias.defvjp(_add_window_bias_fwd, _add_window_bias_bwd)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample ('dropout' rng, train only)."""
  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows, with a learned relative position bias."""
  num_heads: int
  window_size: int  # the configured window: the bias table is ((2W-1)^2, heads)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, window, mask=None):
    # x: (B * nW, N, C) with N = wh * ww; mask: (nW, N, N) or None.
    bw, n, c = x.shape
    head_dim = c // self.num_heads
    table = self.param('relative_position_bias_table', nn.initializers.truncated_normal(0.02),
                       ((2 * self.window_size - 1) ** 2, self.num_heads), jnp.float32)
    index = relative_position_index(window, self.window_size)  # (N, N)
    bias = jnp.transpose(table[index.reshape(-1)].reshape(n, n, self.num_heads), (2, 0, 1))  # (h, N, N)

    qkv = layers.Dense(3 * c, dtype=self.dtype, name='qkv')(x)  # (B*nW, N, 3C)
    qkv = qkv.reshape(bw, n, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B*nW, h, N, d)
    logits = jnp.einsum('bhqd,bhkd->bhqk', q * head_dim ** -0.5, k).astype(jnp.float32)
    logits = add_window_bias(logits, bias)  # + bias[None]
    if mask is not None:
      num_windows = mask.shape[0]
      logits = logits.reshape(-1, num_windows, self.num_heads, n, n) + mask[None, :, None]
      logits = logits.reshape(bw, self.num_heads, n, n)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bhkd->bqhd', probs, v).reshape(bw, n, c)
    return layers.Dense(c, dtype=self.dtype, name='proj')(out)


class Mlp(nn.Module):
  """fc1 -> GELU (erf, as torch.nn.GELU) -> fc2."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    x = layers.Dense(self.hidden, dtype=self.dtype, name='fc1')(x)
    x = layers.gelu(x)
    return layers.Dense(features, dtype=self.dtype, name='fc2')(x)


class SwinBlock(nn.Module):
  """(Shifted-)window attention and MLP, each pre-norm and residual.  (B, H, W, C) -> same."""
  num_heads: int
  window_size: int
  shifted: bool
  mlp_ratio: float
  drop_path: float
  dtype: Any = jnp.float32
  # False: timm's order (roll, then pad). True: the detection / segmentation Swin's (mmseg, LAVT;
  # Hugging Face's too): pad to a multiple of the window, then roll the padded map.
  pad_before_shift: bool = False
  # False: timm's (and HF's) rule, a map not larger than the window gets a window of its size and
  # no shift (clamp_window). True: LAVT's backbone, the window and the shift always as configured
  # (a small map is padded up to one window, the shift mask built on it).
  pad_small_maps: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, h, w, c = x.shape
    shift_size = self.window_size // 2 if self.shifted else 0
    if self.pad_small_maps:
      window, shift = (self.window_size,) * 2, (shift_size,) * 2
    else:
      window, shift = clamp_window((h, w), self.window_size, shift_size)
    y = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name='norm1')(x)
    pad_h, pad_w = (-h) % window[0], (-w) % window[1]
    pad = lambda t: jnp.pad(t, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    if self.pad_before_shift:
      y = pad(y)
    if any(shift):
      y = jnp.roll(y, (-shift[0], -shift[1]), axis=(1, 2))
    if not self.pad_before_shift:
      y = pad(y)  # after the roll, as timm does
    hp, wp = h + pad_h, w + pad_w
    mask = jnp.asarray(shift_mask((hp, wp), window, shift)) if any(shift) else None
    y = WindowAttention(self.num_heads, self.window_size, self.dtype, name='attn')(
        window_partition(y, window), window, mask)  # (B*nW, wh*ww, C)
    y = window_reverse(y, window, b, hp, wp)
    if not self.pad_before_shift:
      y = y[:, :h, :w]
    if any(shift):
      y = jnp.roll(y, shift, axis=(1, 2))
    y = y[:, :h, :w]
    x = x + DropPath(self.drop_path, name='drop_path1')(y, train)
    y = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name='norm2')(x)
    y = Mlp(int(c * self.mlp_ratio), self.dtype, name='mlp')(y)
    return x + DropPath(self.drop_path, name='drop_path2')(y, train)


class PatchMerging(nn.Module):
  """2x2 neighbours concatenated (timm/official order) -> LayerNorm -> Dense(2C, no bias)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    # channel blocks in the order (0,0), (1,0), (0,1), (1,1) for (row, col) offsets
    x = x.reshape(b, h2, 2, w2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h2, w2, 4 * c)
    x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name='norm')(x)
    return layers.Dense(2 * c, use_bias=False, dtype=self.dtype, name='reduction')(x)


class PatchProjection(nn.Module):
  """A p x p, stride-p convolution written as a matmul over flattened patches (XLA:CPU runs the
  strided convolution's gradient several times slower). Parameters as `nn.Conv`: kernel
  (p, p, C_in, C) in HWIO order, bias (C,)."""
  features: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    b, h, w, c_in = images.shape
    p = self.patch_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (p, p, c_in, self.features),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    patches = images.reshape(b, h // p, p, w // p, p, c_in).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, h // p, w // p, p * p * c_in)  # (B, H/p, W/p, p*p*C_in), HWI order
    out = layers.matmul_dot_general(patches.astype(self.dtype),
                                    kernel.reshape(p * p * c_in, -1).astype(self.dtype),
                                    (((3,), (0,)), ((), ())))
    return out + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> linear projection -> LayerNorm.  (B, H/p, W/p, C)."""
  embed_dim: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = PatchProjection(self.embed_dim, self.patch_size, self.dtype, name='proj')(
        images.astype(self.dtype))
    return nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, name='norm')(x)


class SwinStage(nn.Module):
  """Patch merging (stages > 0) then `depth` blocks, alternating plain and shifted windows."""
  depth: int
  num_heads: int
  window_size: int
  downsample: bool
  drop_path: Sequence[float]
  mlp_ratio: float
  remat: bool
  dtype: Any = jnp.float32
  pad_before_shift: bool = False  # SwinBlock's
  pad_small_maps: bool = False    # SwinBlock's

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.downsample:
      x = PatchMerging(self.dtype, name='downsample')(x)  # (B, H/2, W/2, 2C)
    block = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else SwinBlock
    for j in range(self.depth):
      x = block(self.num_heads, self.window_size, shifted=j % 2 == 1, mlp_ratio=self.mlp_ratio,
                drop_path=self.drop_path[j], dtype=self.dtype,
                pad_before_shift=self.pad_before_shift, pad_small_maps=self.pad_small_maps,
                name=f'blocks_{j}')(x, train)
    return x


class SwinTransformer(nn.Module):
  """Swin backbone: images (B, H, W, 3) -> the four raw stage maps (strides 4, 8, 16, 32)."""
  embed_dim: int
  depths: Sequence[int]
  num_heads: Sequence[int]
  window_size: int
  patch_size: int
  mlp_ratio: float
  drop_path_rate: float
  remat: bool                     # `model.remat`
  dtype: Any = jnp.float32
  pad_before_shift: bool = False  # SwinBlock's
  pad_small_maps: bool = False    # SwinBlock's

  @nn.compact
  def __call__(self, images, train: bool = False, between_stages=None) -> Tuple[jnp.ndarray, ...]:
    """between_stages: None, or fn(i, x) -> (the input of stage i + 1, stage i's output), called on
    stage i's map after its blocks (LAVT's pixel-word attention and gate, models/lavt.py); its
    modules belong to the caller. None: each stage's map is both."""
    _, h, w, _ = images.shape
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f'Swin input {h}x{w} is not a multiple of the patch size {self.patch_size}')
    x = PatchEmbed(self.embed_dim, self.patch_size, self.dtype, name='patch_embed')(images)
    rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()  # linear per block
    outputs = []
    for i, depth in enumerate(self.depths):
      start = sum(self.depths[:i])
      x = SwinStage(depth, self.num_heads[i], self.window_size, downsample=i > 0,
                    drop_path=tuple(rates[start:start + depth]), mlp_ratio=self.mlp_ratio,
                    dtype=self.dtype, remat=self.remat, pad_before_shift=self.pad_before_shift,
                    pad_small_maps=self.pad_small_maps, name=f'layers_{i}')(x, train)
      out = x  # (B, H/2^(i+2), W/2^(i+2), 2^i C)
      if between_stages is not None:
        x, out = between_stages(i, x)
      outputs.append(out)
    return tuple(outputs)


SIZE_FIELDS = ('embed_dim', 'depths', 'num_heads', 'window_size', 'patch_size', 'mlp_ratio',
               'drop_path_rate')


def config_sizes(vision_cfg) -> dict:
  """SwinTransformer's size fields from `config.model.vision_encoder` (a ConfigDict or a dict;
  other keys are ignored)."""
  return {f: tuple(vision_cfg[f]) if f in ('depths', 'num_heads') else vision_cfg[f]
          for f in SIZE_FIELDS}


class AttentionPool(nn.Module):
  """Attention pooling of eq. 1 (CLIP-style): x4 -> (F_v4, F_vg)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x4):
    b, h, w, c = x4.shape
    tokens = x4.reshape(b, h * w, c)  # (B, hw, C4)
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)  # eq. 1: [x̄4; x4]  (B, 1+hw, C4)
    out = layers.MultiHeadDotProductAttention(  # eq. 1: MHSA over [x̄4; x4]
        num_heads=self.num_heads, qkv_features=c, out_features=c, dtype=self.dtype,
        name='attn')(tokens, tokens)  # (B, 1+hw, C4)
    z_global, z = out[:, 0], out[:, 1:].reshape(b, h, w, c)  # eq. 1: split -> z̄ (B, C4), z (B, h, w, C4)
    return z, z_global
