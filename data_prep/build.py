"""Builds one referring data set into TFDS ArrayRecord records.

  python -m data_prep.build --dataset=refcoco --refer_root=refer/data \
      --images=coco/train2014 --data_dir=~/tensorflow_datasets [--resize_to=480] [--allow_missing] \
      [--mask_rule=lavt]

--images: COCO's train2014/ (COCO_train2014_<12 digits>.jpg, the names of the refer files) or
train2017/ (<12 digits>.jpg, the same images); the log says which it found.
Checks every ref first (annotation present, image file present and decodable, mask non-empty),
prints the problems and fails on any unless --allow_missing, then writes the records and prints
the counts per split. --mask_rule: how a ref's mask is made (data_prep/refer.py MASK_RULES):
'union' (default) or 'lavt' (LAVT's reading of refer's getMask; for LAVT's test to the digit).
"""
import os
import sys

from absl import app
from absl import flags
import tqdm

from data_prep import refer
from data_prep import refer_tfds


def build(dataset: str, refer_root: str, image_root: str, data_dir: str,
          allow_missing: bool = False, resize_to: int | None = None, log=print,
          mask_rule: str = 'union') -> dict:
  """Builds `dataset`; returns {split: {'refs': n, 'sentences': n}, 'dropped': n}.

  Raises ValueError listing the problem refs when there are any and not `allow_missing`.
  """
  data_dir = os.path.expanduser(data_dir)
  if resize_to is not None and resize_to < 1:
    raise ValueError(f'--resize_to={resize_to}: must be a positive size (0 or absent: as they are)')
  prepared = refer.prepare(refer_root, dataset, image_root,
                           progress=lambda it, total, desc: tqdm.tqdm(it, total=total, desc=desc,
                                                                      file=sys.stderr))
  log(f'images: {prepared.images_found}')
  log(refer.report(prepared))
  if prepared.problems and not allow_missing:
    raise ValueError(refer.report(prepared) + '\n(pass --allow_missing to build without them)')
  if prepared.problems:
    log(f'--allow_missing: dropped {len(prepared.problems)} ref(s)')
  if mask_rule not in refer.MASK_RULES:
    raise ValueError(f'--mask_rule={mask_rule!r}: expected one of {sorted(refer.MASK_RULES)}')
  builder = refer_tfds.EavlRefer(config=dataset, data_dir=data_dir, resize_to=resize_to,
                                 prepared=prepared, mask_rule=mask_rule,
                                 file_format='array_record')
  builder.download_and_prepare()
  counts = {split: {'refs': len(refs), 'sentences': sum(len(r['sentences']) for r in refs)}
            for split, refs in prepared.refs.items()}
  counts['dropped'] = len(prepared.problems)
  log(f'{dataset} -> {builder.data_dir}')
  log(f'{"split":<8} {"refs":>8} {"sentences":>10}')
  for split, c in counts.items():
    if split != 'dropped':
      log(f'{split:<8} {c["refs"]:>8} {c["sentences"]:>10}')
  return counts


def main(argv):
  del argv
  try:
    build(FLAGS.dataset, FLAGS.refer_root, FLAGS.images, FLAGS.data_dir,
          allow_missing=FLAGS.allow_missing,
          resize_to=None if FLAGS.resize_to == 0 else FLAGS.resize_to, mask_rule=FLAGS.mask_rule)
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
  flags.DEFINE_enum('mask_rule', 'union', list(refer.MASK_RULES),
                    "union: the annotation's polygons merged; lavt: LAVT's (exactly one polygon)")
  app.run(main)
