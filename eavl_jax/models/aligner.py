"""Vision-language aligner (eq. 11-14): multi-mask generator, multi-query estimator, weighted sum.

mode='fixed' is the ablation of table III: one learned 3x3 kernel over F_p, no queries in the head.

Any head can call it with its own mask features and queries: EAVL gives the decoder's F_s at 1/16
(upsample_features=True: eq. 11's F_p = Up(Conv(Up(F_s)))); a host model whose decoder already
ends at 1/4 (LAVT, models/lavt.py) gives that map (upsample_features=False: F_p = Conv(F)).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from eavl_jax.models import dynamic_conv
from eavl_jax.models import layers

ACTIVATIONS = {'none': lambda x: x, 'relu': nn.relu}


class Aligner(nn.Module):
  hidden_dim: int             # C; the mask features have C_p = C / 2 channels
  mode: str                   # model.aligner.* (configs/base.py holds every default)
  use_estimator: bool
  estimator_heads: int
  kernel_activation: str      # σ on F_pn (eq. 11)
  feature_activation: str     # on F_p after its conv: eq. 11 has none
  conv_impl: str
  dtype: jnp.dtype = jnp.float32
  upsample_features: bool = True    # eq. 11's two Up(.): the input is at 1/16; False: at 1/4

  @nn.compact
  def __call__(self, f_s, f_q):
    """f_s (B,H3,W3,C_in) (upsample_features; else (B,4H3,4W3,C_in)), f_q (B,N_q,C)
    -> dict(logits (B,4H3,4W3), masks (B,N,4H3,4W3), scores (B,N))."""
    c_p = self.hidden_dim // 2
    up = layers.upsample2x if self.upsample_features else lambda x: x
    f_p = up(f_s)
    f_p = nn.Conv(c_p, (3, 3), padding='SAME', dtype=self.dtype, name='mask_conv')(f_p)
    f_p = ACTIVATIONS[self.feature_activation](f_p)
    f_p = up(f_p)                                                   # eq. 11: F_p (B, 4H3, 4W3, C_p)
    b = f_p.shape[0]

    if self.mode == 'fixed':
      mask = nn.Conv(1, (3, 3), padding='SAME', dtype=self.dtype, name='fixed_kernel')(f_p)
      masks = mask[..., 0][:, None].astype(jnp.float32)           # (B, 1, 4H3, 4W3)
      scores = jnp.ones((b, 1), jnp.float32)
      return dict(logits=masks[:, 0], masks=masks, scores=scores)

    n_q = f_q.shape[1]
    sigma = ACTIVATIONS[self.kernel_activation]
    f_pn = layers.Dense(9 * c_p + 1, dtype=self.dtype, name='kernel_generator')(f_q)
    f_pn = sigma(f_pn)                                              # eq. 11
    kernels = f_pn[..., :9 * c_p].reshape(b, n_q, 3, 3, c_p)      # W_qn (B, N_q, 3, 3, C_p)
    bias = f_pn[..., 9 * c_p]                                       # (B, N_q)
    masks = dynamic_conv.dynamic_conv(f_p, kernels, bias, self.conv_impl)  # eq. 12: (B, N_q, 4H3, 4W3)
    masks = masks.astype(jnp.float32)

    if self.use_estimator and n_q > 1:  # one query: softmax of one score is 1, nothing to estimate
      s = layers.MultiHeadDotProductAttention(num_heads=self.estimator_heads, dtype=self.dtype,
                                              name='estimator_attention')(f_q)
      s = layers.Dense(1, dtype=self.dtype, name='estimator_score')(s)[..., 0]
      scores = jax.nn.softmax(s.astype(jnp.float32), axis=-1)      # eq. 13: S_q (B, N_q)
    else:
      scores = jnp.full((b, n_q), 1.0 / n_q, jnp.float32)
    logits = jnp.einsum('bn,bnhw->bhw', scores, masks)              # eq. 14
    return dict(logits=logits, masks=masks, scores=scores)


def from_config(m, dtype, mode=None, upsample_features=True, name='aligner'):
  """The aligner of `config.model` m, its fields by keyword; mode: model.aligner.mode unless
  given (LAVT's aligner head)."""
  a = m.aligner
  return Aligner(hidden_dim=m.hidden_dim, mode=mode or a.mode, use_estimator=a.use_estimator,
                 estimator_heads=a.estimator_heads, kernel_activation=a.kernel_activation,
                 feature_activation=a.feature_activation, conv_impl=a.conv_impl, dtype=dtype,
                 upsample_features=upsample_features, name=name)
