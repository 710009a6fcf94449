"""Small building blocks shared by the head modules."""
import jax
import jax.numpy as jnp
import flax.linen as nn


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


class ProjectReLU(nn.Module):
  """σ(X W) of eq. 2, 3, 6, 8-10: a Dense (1x1 conv) and a ReLU, with an optional LayerNorm."""
  features: int
  use_norm: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.features, dtype=self.dtype)(x)
    if self.use_norm:
      x = nn.LayerNorm(dtype=self.dtype)(x)
    return nn.relu(x)
