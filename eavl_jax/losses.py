"""The training loss: binary cross-entropy with logits, optional dice.

Where (config.loss.at_input_size): on the S/4 map against the ground truth resized to it
(config.loss.target_resize: by nearest, as CRIS, or by area: soft targets), or on the
logits upsampled bilinearly to the input size S against the ground truth as it comes (LAVT), the
resize evaluation applies before thresholding.
"""
import jax
import jax.numpy as jnp
import optax


def resize_mask(mask, height, width, method='nearest'):
  """Ground truth (B, S, S) in {0, 1} -> (B, height, width) float32.

  'nearest': the pixel at each cell's centre, {0, 1}. 'area': the share of each cell's pixels
  that are foreground, in [0, 1] (S must be a multiple of height and width).
  """
  b, s_h, s_w = mask.shape
  mask = mask.astype(jnp.float32)
  if method == 'area':
    if s_h % height or s_w % width:
      raise ValueError(f'loss.target_resize=area: ground truth {s_h}x{s_w} is not a multiple of '
                       f'the logits {height}x{width}')
    return mask.reshape(b, height, s_h // height, width, s_w // width).mean((2, 4))
  if method != 'nearest':
    raise ValueError(f"loss.target_resize={method!r}: expected 'nearest' or 'area'")
  return jax.image.resize(mask, (b, height, width), method='nearest')


def dice_loss(logits, target, eps=1.0):
  p = jax.nn.sigmoid(logits).reshape(logits.shape[0], -1)
  t = target.reshape(target.shape[0], -1)
  return 1.0 - (2.0 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)  # (B,)


def upsample_logits(logits, height, width):
  """(..., h, w) -> (..., height, width): bilinear, half-pixel centres, the resize of evaluation
  (metrics.upsample_to_canvas) and of predict.py."""
  return jax.image.resize(logits, logits.shape[:-2] + (height, width), 'linear', antialias=False)


def per_sample_loss(logits, gt_mask, loss_config):
  """logits (B, h, w) float32, gt_mask (B, S, S) -> (B,)."""
  if loss_config.at_input_size:
    logits = upsample_logits(logits, *gt_mask.shape[1:])                    # (B, S, S)
    target = gt_mask.astype(jnp.float32)
  else:
    target = resize_mask(gt_mask, *logits.shape[1:], loss_config.target_resize)  # (B, h, w)
  loss = loss_config.bce_weight * optax.sigmoid_binary_cross_entropy(logits, target).mean((1, 2))
  if loss_config.dice_weight:
    loss = loss + loss_config.dice_weight * dice_loss(logits, target)
  return loss


def loss_fn(logits, gt_mask, loss_config):
  """The mean of `per_sample_loss` over the batch: a scalar."""
  return per_sample_loss(logits, gt_mask, loss_config).mean()
