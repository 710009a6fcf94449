"""Fusion neck (eq. 2-5): multi-scale vision features, optionally gated by F_tg, into F_inte.

The multi-query generator runs the same block without F_tg for its dense vision features (eq. 6).
"""
import flax.linen as nn
import jax.numpy as jnp

from eavl_jax.models import layers


class FusionNeck(nn.Module):
  hidden_dim: int             # C
  norm: str                   # the head's norm inside each σ(XW): layers.HEAD_NORMS
  gate_open_at_init: bool     # σ(F_tg W_tg) of eq. 2 starts at 1 (layers.ProjectReLU); eq. 6: unused
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, f_v2, f_v3, f_v4, f_tg=None, train=False):
    """f_v2 (B,H2,W2,C2), f_v3 (B,H3,W3,C3), f_v4 (B,H4,W4,C4), f_tg (B,C) or None -> (B,H3,W3,C)."""
    c, half = self.hidden_dim, self.hidden_dim // 2
    proj = lambda feats, name: (
        lambda x: layers.ProjectReLU(feats, self.norm, self.dtype, name=name)(x, train))

    m4 = proj(c, 'v4')(f_v4)                                        # (B, H4, W4, C)
    if f_tg is not None:
      tg = layers.ProjectReLU(c, self.norm, self.dtype, self.gate_open_at_init, name='tg')(
          layers.Dense(c, dtype=self.dtype, name='text_global_proj')(f_tg), train)
      m4 = m4 * tg[:, None, None, :]                                # eq. 2
    m4 = layers.upsample2x(m4)                                      # eq. 2 / eq. 6: (B, H3, W3, C)

    m3 = jnp.concatenate([proj(half, 'm4')(m4), proj(half, 'v3')(f_v3)], axis=-1)  # eq. 3
    v2 = nn.avg_pool(f_v2, (2, 2), strides=(2, 2))                  # F'_v2 = Avg(F_v2)
    m2 = jnp.concatenate([proj(half, 'm3')(m3), proj(half, 'v2')(v2)], axis=-1)    # eq. 3

    m = nn.Conv(c, (1, 1), dtype=self.dtype, name='aggregate')(
        jnp.concatenate([m2, m3, m4], axis=-1))                     # eq. 4: (B, H3, W3, C)
    b, h, w, _ = m.shape
    coords = layers.coord_features(b, h, w, m.dtype)
    return nn.Conv(c, (3, 3), padding='SAME', dtype=self.dtype, name='coord_conv')(
        jnp.concatenate([m, coords], axis=-1))                      # eq. 5: F_inte (B, H3, W3, C)
