"""Multi-query generator (eq. 6-10): N_q queries, each a vision-guided attention over the words."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from eavl_jax.models import layers
from eavl_jax.models import neck


class QueryGenerator(nn.Module):
  hidden_dim: int             # C
  num_queries: int            # N_q
  use_global_vision: bool     # eq. 8 with F_vg (configs/base.py holds every default)
  scale_word_attention: bool  # eq. 9 divided by sqrt(C): a departure
  normalize_word_attention: bool  # LayerNorm (learned scale) on eq. 9's q and k: a departure
  norm: str                   # the head's norm inside each σ(XW) and conv: layers.HEAD_NORMS
  gate_open_at_init: bool     # σ(F_vg W_vg) of eq. 8 starts at 1 (layers.ProjectReLU)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, f_v2, f_v3, f_v4, f_vg, f_t, text_mask, train=False):
    """f_v* as in the neck, f_vg (B,C4), f_t (B,L,C), text_mask (B,L) 1 = word -> F_q (B,N_q,C)."""
    c = self.hidden_dim
    words = text_mask[..., None]                                    # (B, L, 1): norm statistics
    proj = lambda feats, name, mask=None: (
        lambda x: layers.ProjectReLU(feats, self.norm, self.dtype, name=name)(x, train, mask))

    # Dense vision features: the neck without F_tg (eq. 6), then three 3x3 convs to N_q maps (eq. 7).
    dense = neck.FusionNeck(c, self.norm, False, self.dtype, name='dense_neck')(
        f_v2, f_v3, f_v4, train=train)
    for i, feats in enumerate((c, c)):
      dense = nn.Conv(feats, (3, 3), padding='SAME', dtype=self.dtype, name=f'reduce_{i}')(dense)
      dense = nn.relu(layers.Norm(self.norm, self.dtype, name=f'reduce_norm_{i}')(dense, train))
    dense = nn.Conv(self.num_queries, (3, 3), padding='SAME', dtype=self.dtype,
                    name='reduce_2')(dense)                        # (B, H3, W3, N_q)
    b, h, w, _ = dense.shape
    f_vd = dense.reshape(b, h * w, self.num_queries).transpose(0, 2, 1)  # eq. 7: (B, N_q, H3*W3)

    # Fused language features (eq. 8).
    if self.use_global_vision:
      gate = layers.ProjectReLU(c, self.norm, self.dtype, self.gate_open_at_init,
                                name='global_vision')(f_vg, train)       # σ(F_vg W_vg) (B, C)
      f_tv = proj(c, 'text', words)(f_t) * gate[:, None, :]           # eq. 8: F_tv (B, L, C)
    else:
      f_tv = f_t  # table IV: "we directly use F_t in eq. 8"

    # Vision-guided word attention (eq. 9). W_vd maps the H3*W3 positions to C, so the model is
    # built for one input size.
    q = proj(c, 'vd')(f_vd)                                         # σ(f_vdn W_vd): (B, N_q, C)
    k = proj(c, 'a', words)(f_tv)                                   # σ(f_tvi W_a):  (B, L, C)
    if self.normalize_word_attention:  # bounds the logits by sqrt(C)·(learned scales) when scaled
      q = nn.LayerNorm(use_bias=False, dtype=self.dtype, name='vd_norm')(q)
      k = nn.LayerNorm(use_bias=False, dtype=self.dtype, name='a_norm')(k)
    a = jnp.einsum('bnc,blc->bnl', q, k).astype(jnp.float32)        # eq. 9: a_ni (B, N_q, L)
    if self.scale_word_attention:
      a = a / jnp.sqrt(c)
    a = jnp.where(text_mask[:, None, :] > 0, a, -1e9)               # padding words never attended
    a = jax.nn.softmax(a, axis=-1).astype(self.dtype)               # A (B, N_q, L)
    self.sow('intermediates', 'word_attention', a)                  # for diagnostics only

    v = proj(c, 'tv', words)(f_tv)                                  # σ(F_tv W_tv): (B, L, C)
    return jnp.einsum('bnl,blc->bnc', a, v)                         # eq. 10: F_q (B, N_q, C)


def from_config(m, dtype, name='query_generator'):
  """The generator of `config.model` m, its fields by keyword (EAVL and LAVT's aligner head)."""
  g = m.query_generator
  return QueryGenerator(hidden_dim=m.hidden_dim, num_queries=m.num_queries,
                        use_global_vision=g.use_global_vision,
                        scale_word_attention=g.scale_word_attention,
                        normalize_word_attention=g.normalize_word_attention, norm=m.head_norm,
                        gate_open_at_init=m.gates_open_at_init, dtype=dtype, name=name)
