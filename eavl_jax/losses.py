"""The training loss (config.loss.name): binary cross-entropy with logits and optional dice
('bce'), or LAVT's class-weighted 2-class cross-entropy ('weighted_ce').

Where (config.loss.at_input_size): on the S/4 map against the ground truth resized to it
(config.loss.target_resize: by nearest, as CRIS, or by area: soft targets), or on the
logits upsampled bilinearly to the input size S against the ground truth as it comes (LAVT).
That upsampling follows the model (`corners_aligned`): EAVL's with half-pixel centres, the resize
of protocol 'original'; LAVT's (model.name='lavt') with the corners aligned, as LAVT's model ends
(lib/_utils.py) and as protocol 'lavt' scores.
"""
import jax
import jax.numpy as jnp
import optax

from eavl_jax import resize

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
  return resize.half_pixel(logits, height, width)


def corners_aligned(model_config):
  """Whether the loss at the input size upsamples with the corners aligned: LAVT's model does
  (model.name='lavt'); EAVL keeps half-pixel centres."""
  return model_config.name == 'lavt'


def _placed(logits, gt_mask, loss_config, corners=False):
  """-> (logits, target) where the loss is taken (loss.at_input_size), both (B, h, w) float32;
  corners: `corners_aligned(config.model)`."""
  if loss_config.name not in LOSSES:
    raise ValueError(f'loss.name={loss_config.name!r}: must be one of {LOSSES}')
  if loss_config.at_input_size:
    up = resize.logits_to(logits, *gt_mask.shape[1:], corners)                    # (B, S, S)
    return up, gt_mask.astype(jnp.float32)
  return logits, resize_mask(gt_mask, *logits.shape[1:], loss_config.target_resize)  # (B, h, w)


def weighted_cross_entropy(logits, target, class_weights):
  """LAVT's loss per pixel: the 2-class cross-entropy of the logit d = object - background
  (softmax over the two classes is sigmoid(d)), times the weight of the pixel's class.
  -> (weighted loss, weight), both (B, h, w); a soft target mixes the two classes' terms."""
  w_background, w_object = class_weights
  weight = w_background * (1.0 - target) + w_object * target
  return weight * optax.sigmoid_binary_cross_entropy(logits, target), weight


def per_sample_loss(logits, gt_mask, loss_config, corners=False):
  """logits (B, h, w) float32, gt_mask (B, S, S) -> (B,); corners: `corners_aligned`."""
  logits, target = _placed(logits, gt_mask, loss_config, corners)
  if loss_config.name == 'weighted_ce':
    loss, weight = weighted_cross_entropy(logits, target, loss_config.class_weights)
    return loss.sum((1, 2)) / weight.sum((1, 2))
  loss = loss_config.bce_weight * optax.sigmoid_binary_cross_entropy(logits, target).mean((1, 2))
  if loss_config.dice_weight:
    loss = loss + loss_config.dice_weight * dice_loss(logits, target)
  return loss


def loss_fn(logits, gt_mask, loss_config, corners=False):
  """A scalar: the mean of `per_sample_loss` over the batch; 'weighted_ce': the weighted loss of
  every pixel of the batch over the sum of their weights (torch's cross_entropy with `weight`).
  corners: `corners_aligned(config.model)` (the trainer passes it)."""
  if loss_config.name == 'weighted_ce':
    loss, weight = weighted_cross_entropy(*_placed(logits, gt_mask, loss_config, corners),
                                          loss_config.class_weights)
    return loss.sum() / weight.sum()
  return per_sample_loss(logits, gt_mask, loss_config, corners).mean()
