"""LAVT (language-aware vision transformer, Yang et al., CVPR 2022) with our Swin and BERT.

After the blocks of each Swin stage i, the pixel-word attention module (PWAM) attends from every
pixel to the words; its output r_i, scaled by the language gate (LG) tanh(W2 ReLU(W1 r_i)), is
added to the stage's map, which goes on to stage i + 1 (patch merging first). The four r_i, each
LayerNorm'ed (LAVT's norm0..norm3), feed the simple top-down decoder: at each scale the coarser map
is upsampled (bilinear, corners aligned) onto the finer, concatenated with it, and passed through
two (3x3 conv, BatchNorm, ReLU); its 1/4 map (4E channels) then meets the head:

- model.lavt.head='fixed': LAVT's own, a 1x1 conv to the two classes (background, object); the
  model's logit is their difference (softmax over two classes = sigmoid of the difference);
- model.lavt.head='aligner': the vision-language aligner of eq. 11-14 (models/aligner.py), its
  dynamic kernels applied to the decoder's 1/4 map, its queries made by the multi-query generator
  (eq. 6-10) from LAVT's own features: the normalised r_2, r_3, the attention pooling (eq. 1) of
  r_4, and the projected words (docs/lavt.md).

Stage 4's gated map feeds no later stage, so LAVT's stage-4 gate is left out (its released weights
are dropped on loading, eavl_jax/weights/lavt.py). The Swin pads each map before the cyclic shift,
and pads a map not larger than the window up to it keeping the shift, as LAVT's
(`pad_before_shift`, `pad_small_maps`). Output as EAVL's: dict(logits (B, S/4, S/4), masks, scores).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eavl_jax.models import aligner as aligner_lib
from eavl_jax.models import bert
from eavl_jax.models import layers
from eavl_jax.models import query_generator as query_generator_lib
from eavl_jax.models import swin

HEADS = ('fixed', 'aligner')
NUM_STAGES = 4
_NORM_EPS = 1e-5          # torch's LayerNorm, InstanceNorm1d and BatchNorm2d default
_PADDING_LOGIT = -1e9     # attention logit of a padding word: weight exactly 0


def validate_config(m):
  """Raises ValueError naming the field for a LAVT config that cannot be built (model.name='lavt';
  the fields shared with EAVL are checked by eavl.validate_config)."""
  l = m.lavt
  if l.head not in HEADS:
    raise ValueError(f'model.lavt.head={l.head!r}: must be one of {HEADS}')
  heads = tuple(l.fusion_heads)
  widths = [m.vision_encoder.embed_dim * 2 ** i for i in range(NUM_STAGES)]
  if len(heads) != NUM_STAGES or any(h < 1 or w % h for h, w in zip(heads, widths)):
    raise ValueError(f'model.lavt.fusion_heads={heads}: four head counts, each dividing its '
                     f'stage width {widths}')
  if m.aligner.mode != 'aligner':
    raise ValueError(f"model.aligner.mode={m.aligner.mode!r} with model.name='lavt': LAVT's fixed "
                     "kernel is model.lavt.head='fixed'; the aligner.mode switch is EAVL's")


def interpolation_matrix(size_out, size_in):
  """(size_out, size_in) weights of 1D linear interpolation with the end points aligned (torch's
  align_corners=True): output i samples the input at i (size_in - 1) / (size_out - 1)."""
  pos = np.arange(size_out) * ((size_in - 1) / max(size_out - 1, 1))
  low = np.minimum(np.floor(pos).astype(np.int64), size_in - 1)
  high = np.minimum(low + 1, size_in - 1)
  frac = pos - low
  weights = np.zeros((size_out, size_in), np.float64)
  np.add.at(weights, (np.arange(size_out), low), 1.0 - frac)
  np.add.at(weights, (np.arange(size_out), high), frac)
  return weights.astype(np.float32)


def resize_align_corners(x, height, width):
  """Bilinear resize with the corner pixels aligned (LAVT's decoder).  (B,h,w,C) -> (B,H,W,C)."""
  rows = jnp.asarray(interpolation_matrix(height, x.shape[1]), x.dtype)   # (H, h)
  cols = jnp.asarray(interpolation_matrix(width, x.shape[2]), x.dtype)    # (W, w)
  return jnp.einsum('Hh,Ww,bhwc->bHWc', rows, cols, x)


def instance_norm(x):
  """torch's InstanceNorm1d (no affine) over the positions of each sample and channel.
  (B, N, C) -> (B, N, C)."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(1, keepdims=True)
  var = ((x32 - mean) ** 2).mean(1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + _NORM_EPS)).astype(x.dtype)


class PixelWordAttention(nn.Module):
  """PWAM: each pixel attends to the words; the attended language features, multiplied by the
  projected pixel, are projected once more.

    V = GELU(X W_vis);  Q = IN(X W_q);  K = (T W_k) m;  T_v = (T W_v) m         (m: 1 = word)
    A = softmax_words(Q K^T / sqrt(C) over real words);  G = IN((A T_v) W_o)     (per head)
    out = GELU((V * G) W_mm)

  All widths are the stage's C; T is BERT's last hidden state (B, L, H). Padding words get no
  attention weight and a zero value, so they never change a pixel's output.
  """
  num_heads: int                # `model.lavt.fusion_heads[i]`
  dropout: float                # `model.lavt.fusion_dropout`
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, words, word_mask, train=False):
    """x (B,H,W,C), words (B,L,H_t), word_mask (B,L) -> (B,H,W,C)."""
    b, h, w, c = x.shape
    d = c // self.num_heads
    dense = lambda name: layers.Dense(c, dtype=self.dtype, name=name)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    pixels = x.reshape(b, h * w, c)                                  # (B, HW, C)
    vis = drop(layers.gelu(dense('vis_project')(pixels)))            # V (B, HW, C)

    real = word_mask[:, :, None].astype(self.dtype)                  # (B, L, 1)
    query = instance_norm(dense('query')(pixels)).reshape(b, h * w, self.num_heads, d)
    key = (dense('key')(words) * real).reshape(b, -1, self.num_heads, d)      # (B, L, h, d)
    value = (dense('value')(words) * real).reshape(b, -1, self.num_heads, d)  # (B, L, h, d)
    logits = jnp.einsum('bnhd,blhd->bhnl', query, key).astype(jnp.float32) * c ** -0.5
    logits = jnp.where(word_mask[:, None, None, :] > 0, logits, _PADDING_LOGIT)
    attention = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # (B, h, HW, L)
    attended = jnp.einsum('bhnl,blhd->bnhd', attention, value).reshape(b, h * w, c)
    lang = instance_norm(dense('out')(attended))                     # G (B, HW, C)

    out = drop(layers.gelu(dense('project_mm')(vis * lang)))         # (B, HW, C)
    return out.reshape(b, h, w, c)


class LanguageGate(nn.Module):
  """LG: tanh(ReLU(r W1) W2), no biases, per pixel and channel.  (B,H,W,C) -> (B,H,W,C)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, r):
    c = r.shape[-1]
    g = nn.relu(layers.Dense(c, use_bias=False, dtype=self.dtype, name='dense_0')(r))
    return jnp.tanh(layers.Dense(c, use_bias=False, dtype=self.dtype, name='dense_1')(g))


class SimpleDecoder(nn.Module):
  """LAVT's top-down decoder without its classifier: (Y1..Y4) -> (B, H1, W1, hidden) at 1/4.

  Scale k = 4, 3, 2 (LAVT's names conv1_k, bn1_k, conv2_k, bn2_k): the running map, upsampled
  onto the next finer Y, concatenated with it, then twice (3x3 conv without bias, BatchNorm, ReLU).
  BatchNorm takes its statistics over the global batch in training (LAVT's SyncBatchNorm) and
  keeps running averages (collection 'batch_stats') for evaluation.
  """
  hidden: int                 # LAVT: 8E / 2 = 4E
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y1, y2, y3, y4, train=False):
    x = y4
    for k, skip in ((4, y3), (3, y2), (2, y1)):
      if x.shape[1:3] != skip.shape[1:3]:
        x = resize_align_corners(x, *skip.shape[1:3])
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      for j in (1, 2):
        x = nn.Conv(self.hidden, (3, 3), padding='SAME', use_bias=False, dtype=self.dtype,
                    name=f'conv{j}_{k}')(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=_NORM_EPS,
                         use_fast_variance=False, dtype=self.dtype, name=f'bn{j}_{k}')(x)
        x = nn.relu(x)
    return x                                                         # (B, H1, W1, hidden)


class AlignerHead(nn.Module):
  """The aligner (eq. 11-14) on a host model: queries from the host's multi-modal maps and words,
  kernels over the host decoder's 1/4 map. Fields as EAVL's (model.hidden_dim, num_queries,
  query_generator, aligner, head_norm, gates_open_at_init, vision_encoder.pool_heads)."""
  config: Any                 # a frozen `config.model`

  @nn.compact
  def __call__(self, mask_features, f_v2, f_v3, x4, words, word_mask, train=False):
    """mask_features (B,H1,W1,C_d); f_v2, f_v3, x4: the host's maps at 1/8, 1/16, 1/32;
    words (B,L,H_t), word_mask (B,L) -> dict(logits (B,H1,W1), masks, scores)."""
    m = self.config
    dtype, c = jnp.dtype(m.dtype), m.hidden_dim
    f_v4, f_vg = swin.AttentionPool(num_heads=m.vision_encoder.pool_heads, dtype=dtype,
                                    name='attention_pool')(x4)      # eq. 1
    f_t = layers.Dense(c, dtype=dtype, name='text_proj')(words)      # F_t (B, L, C)
    f_q = query_generator_lib.from_config(m, dtype)(
        f_v2, f_v3, f_v4, f_vg, f_t, word_mask, train=train)          # eq. 6-10: F_q (B, N_q, C)
    return aligner_lib.from_config(m, dtype, mode='aligner', upsample_features=False)(
        mask_features, f_q)                                         # eq. 11-14 on F = F_p


class LAVT(nn.Module):
  config: Any  # a frozen `config.model` with name='lavt'

  @nn.compact
  def __call__(self, image, input_ids, attention_mask, train: bool = False,
               refs_per_image: int = 1):
    """image (B_i,S,S,3), input_ids/attention_mask (B,L) -> dict(logits (B,S/4,S/4), masks, scores).

    B = B_i * refs_per_image (expressions b*K .. b*K+K-1 are about image b). The words enter the
    first Swin stage, so each image is encoded once per expression.
    """
    m = self.config
    layers.check_inputs(m, image, input_ids, attention_mask, refs_per_image)
    dtype = jnp.dtype(m.dtype)
    image = jnp.repeat(image.astype(dtype), refs_per_image, axis=0)  # (B, S, S, 3)

    words = bert.BertModel(**{f: m.text_encoder[f] for f in bert.SIZE_FIELDS}, dtype=dtype,
                           remat=m.remat, name='text_encoder')(input_ids, attention_mask,
                                                               train=train)  # (B, L, H_t)
    l = m.lavt
    pwams = [PixelWordAttention(l.fusion_heads[i], l.fusion_dropout, dtype, name=f'pwam_{i}')
             for i in range(NUM_STAGES)]
    gates = [LanguageGate(dtype, name=f'gate_{i}') for i in range(NUM_STAGES - 1)]

    def fuse(i, x):  # after stage i's blocks: (the input of stage i + 1, the stage's output r_i)
      r = pwams[i](x, words, attention_mask, train)
      return (x if i == NUM_STAGES - 1 else x + gates[i](r) * r), r

    v = m.vision_encoder
    outputs = swin.SwinTransformer(
        **swin.config_sizes(v), remat=m.remat, dtype=dtype, pad_before_shift=True,
        pad_small_maps=True, name='vision_encoder')(image, train=train, between_stages=fuse)
    y1, y2, y3, y4 = (nn.LayerNorm(epsilon=_NORM_EPS, dtype=dtype, name=f'output_norm_{i}')(r)
                      for i, r in enumerate(outputs))                # Y_i (B, S/2^(i+2), ., 2^i E)
    features = SimpleDecoder(4 * v.embed_dim, dtype, name='decoder')(y1, y2, y3, y4, train)

    if l.head == 'aligner':
      return AlignerHead(m, name='aligner_head')(features, y2, y3, y4, words, attention_mask,
                                                 train)
    classes = nn.Conv(2, (1, 1), dtype=dtype, name='classifier')(features)  # (B, S/4, S/4, 2)
    logits = (classes[..., 1] - classes[..., 0]).astype(jnp.float32)         # object - background
    return dict(logits=logits, masks=logits[:, None],
                scores=jnp.ones((logits.shape[0], 1), jnp.float32))
