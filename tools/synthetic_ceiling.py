"""How well can a low-resolution map describe the synthetic task's masks at all?

  python -m tools.synthetic_ceiling [--num_images=150] [--seed=0]

EAVL's logits are a (S/4)² map, upsampled bilinearly to the image and thresholded at 0 for
evaluation (docs/evaluation.md); the map itself is a 3x3 convolution over F_p = Up(Conv(Up(F_s))), so its
detail comes from the (S/8)² map of eq. 11. For shapes drawn by `eavl_jax.data.synthetic` this prints,
per target size, the IoU that a *perfect* map of each resolution reaches after that upsampling:
the map holding each cell's foreground share ('area', a 0.5 threshold), or the pixel at each
cell's centre ('nearest', the training target of loss.target_resize='nearest'). docs/synthetic.md
holds a run.
"""
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from eavl_jax.data import synthetic
from eavl_jax import losses

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer('num_images', 150, 'images drawn (4 shapes each where they fit)')
  flags.DEFINE_integer('seed', 0, 'random seed')
  flags.DEFINE_integer('image_size', 128, 'image side in pixels')


def upsampled_iou(mask, grid, method):
  """IoU with `mask` (S, S) {0,1} of its (grid, grid) map upsampled bilinearly and thresholded.

  The map is the training target of `loss.target_resize=method` (losses.resize_mask).
  """
  s = mask.shape[0]
  low = np.asarray(losses.resize_mask(jnp.asarray(mask)[None], grid, grid, method))[0] - 0.5
  up = np.asarray(jax.image.resize(jnp.asarray(low), (s, s), 'bilinear')) > 0
  gt = mask > 0
  union = (up | gt).sum()
  return float((up & gt).sum() / union) if union else 0.0


def ceilings(num_images, seed, image_size, grids=(8, 16, 32)):
  """{(size, grid, method): mean IoU} over the shapes of `num_images` generated images."""
  rng = np.random.default_rng(seed)
  ious = {}
  for _ in range(num_images):
    shapes = synthetic._place_shapes(rng, image_size, 4)  # pylint: disable=protected-access
    _, _, masks = synthetic._draw(rng, image_size, shapes)  # pylint: disable=protected-access
    for shape, mask in zip(shapes, masks):
      for grid in grids:
        for method in ('area', 'nearest'):
          ious.setdefault((shape.size, grid, method), []).append(upsampled_iou(mask, grid, method))
  return {k: float(np.mean(v)) for k, v in ious.items()}


def main(argv):
  del argv
  s = FLAGS.image_size
  table = ceilings(FLAGS.num_images, FLAGS.seed, s)
  print(f'best IoU of a perfect low-resolution map, bilinearly upsampled to {s}² '
        f'({FLAGS.num_images} images)')
  print(f'{"target":8s} {"map":>8s} {"area":>7s} {"nearest":>8s}')
  for size in ('small', 'large'):
    for grid in sorted({g for _, g, _ in table}, reverse=True):
      name = f'{grid}² (S/{s // grid})'
      print(f'{size:8s} {name:>8s} {table[(size, grid, "area")]:7.3f} '
            f'{table[(size, grid, "nearest")]:8.3f}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
