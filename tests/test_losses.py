"""The training loss against torch (binary_cross_entropy_with_logits, F.interpolate), in both
places it can be computed: the S/4 map (nearest-resized ground truth) or the input size (logits
upsampled bilinearly, as evaluation does)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import base
from eavl_jax import losses


def _config(at_input_size, dice_weight=0.5):
  c = base.get_config().loss
  c.at_input_size, c.dice_weight = at_input_size, dice_weight
  return c


def _torch_loss(logits, gt, at_input_size, dice_weight=0.5):
  x = torch.tensor(np.asarray(logits))[:, None]                       # (B, 1, h, w)
  t = torch.tensor(np.asarray(gt), dtype=torch.float32)[:, None]      # (B, 1, S, S)
  if at_input_size:
    x = F.interpolate(x, size=t.shape[-2:], mode='bilinear', align_corners=False)
  else:
    t = F.interpolate(t, size=x.shape[-2:], mode='nearest-exact')   # half-pixel centres
  bce = F.binary_cross_entropy_with_logits(x, t, reduction='none').mean((1, 2, 3))
  p, t = torch.sigmoid(x).flatten(1), t.flatten(1)
  dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
  return (bce + dice_weight * dice).numpy()


def test_both_placements_match_torch():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 8, 8)).astype(np.float32) * 3
  gt = (rng.random((3, 32, 32)) < 0.3).astype(np.uint8)
  for at_input_size in (False, True):
    ours = losses.per_sample_loss(jnp.asarray(logits), jnp.asarray(gt), _config(at_input_size))
    np.testing.assert_allclose(ours, _torch_loss(logits, gt, at_input_size), rtol=1e-5, atol=1e-6)


def test_shape_between_the_s4_samples_is_seen_only_at_input_size():
  """A 2x2-pixel object between the centres of the S/4 cells: nearest resizing drops it, so the
  S/4 loss rewards predicting nothing; the input-size loss pushes its logits up."""
  gt = np.zeros((1, 16, 16), np.uint8)
  gt[0, 4:6, 4:6] = 1      # nearest 16 -> 4 samples rows/cols 2, 6, 10, 14: misses 4-5
  assert losses.resize_mask(jnp.asarray(gt), 4, 4).sum() == 0
  logits = jnp.full((1, 4, 4), -2.0)

  def grad(at_input_size):
    return jax.grad(lambda l: losses.loss_fn(l, gt, _config(at_input_size, 0.0)))(logits)[0]

  assert bool((grad(False) > 0).all())       # descent lowers every logit: the object is lost
  assert float(grad(True)[1, 1]) < 0         # descent raises the logit over the object
  assert float(grad(True)[3, 3]) > 0         # and lowers the background


def test_area_targets_are_each_cells_foreground_share():
  """loss.target_resize='area': the S/4 target of a cell is the share of its pixels inside the
  object (what a 0.5 threshold of the upsampled logits should reproduce); 'nearest' keeps only
  the cell's centre pixel, so an object off the centres is lost or blown up to whole cells."""
  gt = np.zeros((1, 16, 16), np.uint8)
  gt[0, 4:6, 4:6] = 1                       # a quarter of cell (1, 1), off its centre pixel
  gt[0, 8:16, 8:11] = 1                     # three quarters of cells (2..3, 2)
  area = np.asarray(losses.resize_mask(jnp.asarray(gt), 4, 4, 'area'))[0]
  want = np.zeros((4, 4), np.float32)
  want[1, 1], want[2:, 2] = 0.25, 0.75
  np.testing.assert_allclose(area, want)
  near = np.asarray(losses.resize_mask(jnp.asarray(gt), 4, 4, 'nearest'))[0]
  assert near[1, 1] == 0 and (near[2:, 2] == 1).all()
  # the optimal logits of BCE against soft targets are their log-odds
  c = _config(False, 0.0)
  c.target_resize = 'area'
  p = np.clip(want, 1e-3, 1 - 1e-3)
  logits = jnp.asarray(np.log(p / (1 - p)))[None]
  g = jax.grad(lambda l: losses.loss_fn(l, gt, c))(logits)
  assert float(jnp.abs(g).max()) < 1e-4


def test_bad_target_resize_is_one_error_naming_the_field():
  c = _config(False)
  c.target_resize = 'bicubic'
  logits = jnp.zeros((1, 4, 4))
  with pytest.raises(ValueError, match="loss.target_resize='bicubic'"):
    losses.loss_fn(logits, np.zeros((1, 16, 16), np.uint8), c)
  c.target_resize = 'area'
  with pytest.raises(ValueError, match='not a multiple'):
    losses.loss_fn(jnp.zeros((1, 5, 5)), np.zeros((1, 16, 16), np.uint8), c)
