"""Writes the synthetic referring task in the refer layout (eavl_jax/data/synthetic.py).

  python -m data_prep.synthetic --out=DIR --num_images=N --seed=S

then `python -m data_prep.build --dataset=synthetic --refer_root=DIR --images=DIR/images
--data_dir=DIR/tfds` builds it like RefCOCO.
"""
from absl import app
from absl import flags

from eavl_jax.data import synthetic


def main(argv):
  del argv
  counts = synthetic.generate(FLAGS.out, FLAGS.num_images, FLAGS.seed,
                              image_size=FLAGS.image_size)
  print(f'wrote {FLAGS.num_images} images to {FLAGS.out}; refs per split: {counts}')


if __name__ == '__main__':
  FLAGS = flags.FLAGS
  flags.DEFINE_string('out', None, 'output folder (refer layout)', required=True)
  flags.DEFINE_integer('num_images', 2000, 'number of images')
  flags.DEFINE_integer('seed', 0, 'random seed (same seed, same files)')
  flags.DEFINE_integer('image_size', 128, 'image side in pixels')
  app.run(main)
