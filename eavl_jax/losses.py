"""The training loss (config.loss.name): binary cross-entropy with logits and optional dice
('bce'), or LAVT's class-weighted 2-class cross-entropy ('weighted_ce').

Where (config.loss.at_input_size): on the S/4 map against the ground truth resized to it
(config.loss.target_resize: by nearest, as CRIS, or by area: soft targets), or on the
logits upsampled bilinearly to the input size S against the ground truth as it comes (LAVT), the
resize evaluation applies before thresholding.
"""
import jax
import jax.numpy as jnp
import optax

LOSSES = ('bce', 'weighted_ce')


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


def _placed(logits, gt_mask, loss_config):
  """-> (logits, target) where the loss is taken (loss.at_input_size), both (B, h, w) float32."""
  if loss_config.name not in LOSSES:
    raise ValueError(f'loss.name={loss_config.name!r}: must be one of {LOSSES}')
  if loss_config.at_input_size:
    return upsample_logits(logits, *gt_mask.shape[1:]), gt_mask.astype(jnp.float32)  # (B, S, S)
  return logits, resize_mask(gt_mask, *logits.shape[1:], loss_config.target_resize)  # (B, h, w)


def weighted_cross_entropy(logits, target, class_weights):
  """LAVT's loss per pixel: the 2-class cross-entropy of the logit d = object - background
  (softmax over the two classes is sigmoid(d)), times the weight of the pixel's class.
  -> (weighted loss, weight), both (B, h, w); a soft target mixes the two classes' terms."""
  w_background, w_object = class_weights
  weight = w_background * (1.0 - target) + w_object * target
  return weight * optax.sigmoid_binary_cross_entropy(logits, target), weight


def per_sample_loss(logits, gt_mask, loss_config):
  """logits (B, h, w) float32, gt_mask (B, S, S) -> (B,)."""
  logits, target = _placed(logits, gt_mask, loss_config)
  if loss_config.name == 'weighted_ce':
    loss, weight = weighted_cross_entropy(logits, target, loss_config.class_weights)
    return loss.sum((1, 2)) / weight.sum((1, 2))
  loss = loss_config.bce_weight * optax.sigmoid_binary_cross_entropy(logits, target).mean((1, 2))
  if loss_config.dice_weight:
    loss = loss + loss_config.dice_weight * dice_loss(logits, target)
  return loss


def loss_fn(logits, gt_mask, loss_config):
  """A scalar: the mean of `per_sample_loss` over the batch; 'weighted_ce': the weighted loss of
  every pixel of the batch over the sum of their weights (torch's cross_entropy with `weight`)."""
  if loss_config.name == 'weighted_ce':
    loss, weight = weighted_cross_entropy(*_placed(logits, gt_mask, loss_config),
                                          loss_config.class_weights)
    return loss.sum() / weight.sum()
  return per_sample_loss(logits, gt_mask, loss_config).mean()
