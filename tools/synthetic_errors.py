"""Where a model trained on the synthetic task errs: val IoU by kind of expression and target size.

  python -m tools.synthetic_errors --config=configs/synthetic.py --workdir=DIR
      [--checkpoint=STEP] [--split=val] [--raw_dir=<workdir>/data/raw]

Every expression of the split is predicted once (the evaluation's own loader and metrics); its
text is parsed with the generator's grammar (`synthetic.parse`) into a family (attributes only, a
superlative / position, a relation) and the attributes it names (for a superlative also whether it
compares positions or sizes);
the target's size ('small' / 'large') is the one the generator recorded. Prints n, mIoU, Pr@0.5,
the mean IoU of the hits (IoU > 0.5), and `select`: how often the shape of the image that the
predicted mask overlaps best (IoU) is the target, which tells a wrong choice of object from a
poor mask of the right one. docs/experiments.md holds runs.
"""
import collections
import contextlib
import io
import os
import pickle
import sys

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags
from pycocotools import coco as coco_api

from eavl_jax.data import synthetic
from eavl_jax import checkpointing
from eavl_jax import errors
from eavl_jax import input_pipeline
from eavl_jax import metrics
from eavl_jax import sharding
from eavl_jax import steps
from eavl_jax import synthetic_task
from eavl_jax.models import builder

FLAGS = flags.FLAGS
NAME_WIDTH = 56   # the printed table's first column


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'Experiment config file.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Training workdir (with data/raw from training).')
  flags.DEFINE_string('checkpoint', None, 'A step of --workdir; default the latest.')
  flags.DEFINE_string('split', 'val', 'Split to analyse.')
  flags.DEFINE_string('raw_dir', None, 'The generated refer files; default '
                      '<workdir>/data/raw (where training generates them).')


def family(expr):
  """'relation', 'superlative / position (<position | size>: <attributes named>)' or
  'attributes (<attributes named>)'."""
  if expr.relation is not None:
    return 'relation'
  named = '+'.join(a for a in ('size', 'colour', 'kind') if getattr(expr.target, a)) or 'none'
  if expr.extreme is not None:
    by = 'size' if expr.extreme in ('largest', 'smallest') else 'position'
    return f'superlative / position ({by}: {named})'
  return f'attributes ({named})'


def per_expression_iou(config, workdir, checkpoint, split):
  """-> [(ref_id, sentence_index, IoU, predicted mask (H, W) bool)] for every expression."""
  variables, _ = checkpointing.restore_variables(config, workdir, checkpoint)
  mesh = sharding.make_mesh(config.mesh)
  predict = steps.make_predict_fn(builder.build_model(config.model))
  loader = input_pipeline.make_eval_loader(config, split, shard_index=0, shard_count=1,
                                           batch_size=config.train.eval_batch_size)
  rows = []
  for batch in loader:
    g = sharding.global_batch({k: batch[k] for k in metrics.EVAL_KEYS}, mesh)
    logits = predict(variables, g)['logits']
    inter, union = metrics.batch_intersection_union(logits, g['mask_orig'], g['orig_size'])
    inter, union = np.asarray(inter), np.asarray(union)
    foreground = np.asarray(metrics.upsample_to_canvas(
        logits, g['orig_size'], config.data.eval_max_size)) > 0               # (B, M, M)
    for j in np.nonzero(batch['valid'])[0]:
      h, w = batch['orig_size'][j]
      rows.append((int(batch['ref_id'][j]), int(batch['sentence_index'][j]),
                   inter[j] / max(union[j], 1), foreground[j, :h, :w]))
  return rows


def selects_target(pred, shape_masks, target):
  """Whether the shape the prediction overlaps best (IoU, > 0) is `target`."""
  ious = [(pred & m).sum() / max((pred | m).sum(), 1) for m in shape_masks]
  return bool(ious[target] > 0 and int(np.argmax(ious)) == target)


def main(argv):
  del argv
  if FLAGS.workdir is None:
    raise app.UsageError('--workdir is required')
  config = synthetic_task.prepare(FLAGS.config, FLAGS.workdir)
  raw = FLAGS.raw_dir or os.path.join(FLAGS.workdir, 'data', 'raw')
  with open(os.path.join(raw, 'synthetic', 'refs(unc).p'), 'rb') as f:
    refs = pickle.load(f)
  texts = {r['ref_id']: [s['sent'] for s in r['sentences']] for r in refs}
  ref_object = {r['ref_id']: (r['image_id'], r['ann_id']) for r in refs}
  with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints its progress
    coco = coco_api.COCO(os.path.join(raw, 'synthetic', 'instances.json'))
  shapes_of_image = {}                              # image_id -> (ann ids, masks), decoded once
  try:
    rows = per_expression_iou(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.split)
  except (ValueError, FileNotFoundError) as e:     # no such step, another config: one line
    sys.exit(errors.error_message(e))
  groups = collections.defaultdict(list)
  for ref_id, j, iou, pred in rows:
    image_id, ann_id = ref_object[ref_id]
    if image_id not in shapes_of_image:
      anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
      shapes_of_image[image_id] = ([a['id'] for a in anns], [coco.annToMask(a) > 0 for a in anns])
    ann_ids, masks = shapes_of_image[image_id]
    selected = selects_target(pred, masks, ann_ids.index(ann_id))
    fam = family(synthetic.parse(texts[ref_id][j]))
    top = fam.split(' (')[0]
    for g in {'all', top, f'{top}, {coco.anns[ann_id]["size"]} target', fam}:
      groups[g].append((iou, selected))
  print(f'{FLAGS.split}: IoU per expression, grouped')
  print(f'{"expressions":<{NAME_WIDTH}}{"n":>6}{"mIoU":>8}{"Pr@0.5":>8}{"IoU of hits":>13}{"select":>8}')
  for g in sorted(groups, key=lambda g: (g != 'all', g)):
    v = np.asarray([iou for iou, _ in groups[g]])
    hits = v[v > 0.5]
    print(f'{g:<{NAME_WIDTH}}{len(v):>6}{v.mean():>8.3f}{(v > 0.5).mean():>8.3f}'
          f'{hits.mean() if len(hits) else float("nan"):>13.3f}'
          f'{np.mean([sel for _, sel in groups[g]]):>8.3f}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
