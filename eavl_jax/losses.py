"""The training loss: binary cross-entropy with logits, optional dice.

Where (config.loss.at_input_size): on the S/4 map against the ground truth resized to it by
nearest (DESIGN.md, CRIS), or on the logits upsampled bilinearly to the input size S against
the ground truth as it comes (LAVT), the resize evaluation applies before thresholding.
"""
import jax
import jax.numpy as jnp
import optax


def resize_mask(mask, height, width):
  """Ground truth (B, S, S) in {0, 1} -> (B, height, width), nearest."""
  b = mask.shape[0]
  return jax.image.resize(mask.astype(jnp.float32), (b, height, width), method='nearest')


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
    target = resize_mask(gt_mask, *logits.shape[1:])                        # (B, h, w)
  loss = loss_config.bce_weight * optax.sigmoid_binary_cross_entropy(logits, target).mean((1, 2))
  if loss_config.dice_weight:
    loss = loss + loss_config.dice_weight * dice_loss(logits, target)
  return loss


def loss_fn(logits, gt_mask, loss_config):
  """The mean of `per_sample_loss` over the batch: a scalar."""
  return per_sample_loss(logits, gt_mask, loss_config).mean()
