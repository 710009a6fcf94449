"""Transformer decoder: queries from F_vt (the H3*W3 vision tokens), keys and values from F_q."""
import flax.linen as nn
import jax.numpy as jnp

from eavl_jax.models import layers


class DecoderLayer(nn.Module):
  num_heads: int
  mlp_dim: int
  dropout: float
  pre_norm: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, pos, memory, train):
    """x (B,N,C) vision tokens, pos (N,C) their 2D sine positions, memory (B,N_q,C) -> (B,N,C)."""
    c = x.shape[-1]
    attention = lambda name: layers.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, dropout_rate=self.dropout,
        deterministic=not train, name=name)
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)
    drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)

    def residual(x, sublayer, name):
      if self.pre_norm:
        return x + drop(sublayer(norm(name)(x)))
      return norm(name)(x + drop(sublayer(x)))

    x = residual(x, lambda y: attention('self_attention')(y + pos, y + pos, y), 'norm1')
    x = residual(x, lambda y: attention('cross_attention')(y + pos, memory), 'norm2')

    def mlp(y):
      y = nn.relu(layers.Dense(self.mlp_dim, dtype=self.dtype, name='mlp_in')(y))
      return layers.Dense(c, dtype=self.dtype, name='mlp_out')(drop(y))
    return residual(x, mlp, 'norm3')


class Decoder(nn.Module):
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout: float
  pre_norm: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, f_vt, f_q, height, width, train=False):
    """f_vt (B, H3*W3, C), f_q (B, N_q, C) -> F_s (B, H3, W3, C)."""
    b, n, c = f_vt.shape
    pos = layers.sine_positions_2d(height, width, c).astype(self.dtype)  # (H3*W3, C)
    x = f_vt
    for i in range(self.num_layers):
      x = DecoderLayer(self.num_heads, self.mlp_dim, self.dropout, self.pre_norm, self.dtype,
                       name=f'layer_{i}')(x, pos, f_q, train)
    if self.pre_norm:
      x = nn.LayerNorm(dtype=self.dtype, name='final_norm')(x)
    return x.reshape(b, height, width, c)
