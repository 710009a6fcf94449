"""Builds one referring data set into TFDS ArrayRecord records.

  python -m data_prep.build --dataset=refcoco --refer_root=refer/data \
      --images=coco/train2014 --data_dir=~/tensorflow_datasets [--resize_to=480] [--allow_missing] \
      [--mask_rule=lavt]

--images: COCO's train2014/ (COCO_train2014_<12 digits>.jpg, the names of the refer files) or
train2017/ (<12 digits>.jpg, the same images); the log says which it found.
Checks every ref first (annotation present, image file present and decodable, mask non-empty),
prints the problems and fails on any unless --allow_missing, then writes the records and prints
the counts per split, read back from the records. A --data_dir that already holds the data set
is refused unless --overwrite (which replaces its records). --mask_rule: how a ref's mask is made (eavl_jax/data/refer.py MASK_RULES):
'union' (default) or 'lavt' (LAVT's reading of refer's getMask; for LAVT's test to the digit).
"""
import sys

from absl import app
from absl import flags

from eavl_jax.data import build
from eavl_jax.data import refer


def main(argv):
  del argv
  try:
    build.build(FLAGS.dataset, FLAGS.refer_root, FLAGS.images, FLAGS.data_dir,
                allow_missing=FLAGS.allow_missing,
                resize_to=None if FLAGS.resize_to == 0 else FLAGS.resize_to,
                mask_rule=FLAGS.mask_rule, overwrite=FLAGS.overwrite)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  FLAGS = flags.FLAGS
  flags.DEFINE_enum('dataset', None, list(refer.DATASETS), 'which data set', required=True)
  flags.DEFINE_string('refer_root', None, 'folder holding <dataset>/refs(...).p and instances.json',
                      required=True)
  flags.DEFINE_string('images', None, 'COCO train2014/ or train2017/ folder (or <synthetic '
                      'out>/images)', required=True)
  flags.DEFINE_string('data_dir', '~/tensorflow_datasets', 'TFDS data_dir to write into')
  flags.DEFINE_integer('resize_to', 0, 'store images resized to this square size (0: as they are)')
  flags.DEFINE_bool('allow_missing', False, 'drop problem refs instead of failing')
  flags.DEFINE_bool('overwrite', False, 'rebuild a data set that --data_dir already holds')
  flags.DEFINE_enum('mask_rule', 'union', list(refer.MASK_RULES),
                    "union: the annotation's polygons merged; lavt: LAVT's (exactly one polygon)")
  app.run(main)
