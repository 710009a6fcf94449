"""EAVL: image and expression in, the referred object's mask logits (at 1/4 of the input) out.

Each part of the paper lives in its own file; the shapes are on the lines below.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from eavl_jax.models import aligner as aligner_lib
from eavl_jax.models import bert
from eavl_jax.models import decoder as decoder_lib
from eavl_jax.models import dynamic_conv
from eavl_jax.models import layers
from eavl_jax.models import neck as neck_lib
from eavl_jax.models import query_generator as query_generator_lib
from eavl_jax.models import swin

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Swin downsamples by 32 and the neck upsamples F_v4 by 2 onto F_v3's grid: the size must divide.
IMAGE_SIZE_MULTIPLE = 32


def validate_config(m):
  """Raises ValueError naming the field (of those LAVT shares with EAVL) that cannot be built;
  builder.validate_config checks the rest."""
  def fail(field, value, why):
    raise ValueError(f'model.{field}={value!r}: {why}')
  if m.image_size <= 0 or m.image_size % IMAGE_SIZE_MULTIPLE:
    fail('image_size', m.image_size, f'must be a positive multiple of {IMAGE_SIZE_MULTIPLE}')
  if m.num_queries < 1:
    fail('num_queries', m.num_queries, 'must be at least 1')
  if m.max_tokens < 2:
    fail('max_tokens', m.max_tokens, 'must hold at least [CLS] and [SEP]')
  if m.hidden_dim < 4 or m.hidden_dim % 4:
    fail('hidden_dim', m.hidden_dim, 'must be a positive multiple of 4')
  if m.dtype not in DTYPES:
    fail('dtype', m.dtype, f'must be one of {sorted(DTYPES)}')
  if m.aligner.mode not in ('aligner', 'fixed'):
    fail('aligner.mode', m.aligner.mode, "must be 'aligner' or 'fixed'")
  for field in ('kernel_activation', 'feature_activation'):
    if m.aligner[field] not in aligner_lib.ACTIVATIONS:
      fail(f'aligner.{field}', m.aligner[field], f'must be one of {sorted(aligner_lib.ACTIVATIONS)}')
  if m.head_norm not in layers.HEAD_NORMS:
    fail('head_norm', m.head_norm, f'must be one of {layers.HEAD_NORMS}')
  if m.aligner.conv_impl not in dynamic_conv.FORMS:
    fail('aligner.conv_impl', m.aligner.conv_impl, f'must be one of {dynamic_conv.FORMS}')
  v = m.vision_encoder
  if len(v.depths) != 4 or len(v.num_heads) != 4:
    fail('vision_encoder.depths', tuple(v.depths), 'Swin needs four stages (depths and num_heads)')
  if m.max_tokens > m.text_encoder.max_position_embeddings:
    fail('max_tokens', m.max_tokens,
         f'exceeds text_encoder.max_position_embeddings={m.text_encoder.max_position_embeddings}')


class EAVL(nn.Module):
  config: Any  # a frozen `config.model`

  @nn.compact
  def __call__(self, image, input_ids, attention_mask, train: bool = False,
               refs_per_image: int = 1):
    """image (B_i,S,S,3), input_ids/attention_mask (B,L) -> dict(logits (B,S/4,S/4), masks, scores).

    B = B_i * refs_per_image: expressions b*K .. b*K+K-1 are about image b. The image features
    (Swin, its norms, eq. 1) are computed once per image and repeated for its K expressions, which
    gives the same outputs as K copies of the image at 1/K of the vision encoder's cost.
    """
    m = self.config
    layers.check_inputs(self.config, image, input_ids, attention_mask, refs_per_image)
    dtype = DTYPES[m.dtype]
    c = m.hidden_dim
    image = image.astype(dtype)

    # Image encoder: Swin stages, a LayerNorm on each stage used, attention pooling (eq. 1).
    v = m.vision_encoder
    _, x2, x3, x4 = swin.SwinTransformer(**swin.config_sizes(v), remat=m.remat, dtype=dtype,
                                         name='vision_encoder')(image, train=train)
    f_v2 = nn.LayerNorm(dtype=dtype, name='vision_norm_2')(x2)     # (B, S/8,  S/8,  2E)
    f_v3 = nn.LayerNorm(dtype=dtype, name='vision_norm_3')(x3)     # (B, S/16, S/16, 4E)
    x4 = nn.LayerNorm(dtype=dtype, name='vision_norm_4')(x4)       # (B, S/32, S/32, 8E)
    f_v4, f_vg = swin.AttentionPool(num_heads=v.pool_heads, dtype=dtype,
                                    name='attention_pool')(x4)      # eq. 1
    if refs_per_image > 1:   # (B_i, ...) -> (B_i * K, ...): each image once per expression
      f_v2, f_v3, f_v4, f_vg = (jnp.repeat(f, refs_per_image, axis=0)
                                for f in (f_v2, f_v3, f_v4, f_vg))

    # Text encoder: BERT's last hidden states; F_t and F_tg are linear projections of them.
    t = m.text_encoder
    hidden = bert.BertModel(**{f: t[f] for f in bert.SIZE_FIELDS}, dtype=dtype, remat=m.remat,
                            name='text_encoder')(input_ids, attention_mask, train=train)  # (B, L, H)
    f_t = layers.Dense(c, dtype=dtype, name='text_proj')(hidden)        # F_t (B, L, C)
    cls = hidden[:, 0]                                              # [CLS] (B, H_bert)

    f_inte = neck_lib.FusionNeck(c, m.head_norm, m.gates_open_at_init, dtype, name='neck')(
        f_v2, f_v3, f_v4, cls if m.neck.use_global_text else None, train=train)  # eq. 2-5
    b, h3, w3, _ = f_inte.shape                                     # F_inte (B, H3, W3, C)
    f_vt = f_inte.reshape(b, h3 * w3, c)                            # F_vt (B, H3*W3, C)

    f_q = query_generator_lib.from_config(m, dtype)(
        f_v2, f_v3, f_v4, f_vg, f_t, attention_mask, train=train)  # eq. 6-10: F_q (B, N_q, C)

    d = m.decoder
    f_s = decoder_lib.Decoder(d.num_layers, d.num_heads, d.mlp_dim, d.dropout, d.pre_norm, dtype,
                              name='decoder')(f_vt, f_q, h3, w3, train=train)  # F_s (B, H3, W3, C)

    return aligner_lib.from_config(m, dtype)(f_s, f_q)              # eq. 11-14
