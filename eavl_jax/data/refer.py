"""Reads and checks the refer layout: `<refer_root>/<folder>/refs(<split_by>).p` + `instances.json`.

Facts of the layout (lichengunc/refer): refs(<split_by>).p is a pickled list of dicts with ref_id,
ann_id, image_id, category_id, split, sent_ids and sentences (dicts with raw, sent, sent_id,
tokens); the refs' own file_name carries an annotation suffix and is not a file: the image's file
name comes from instances.json's `images`. Masks come from the annotation's polygons or RLE.
The refer files name COCO's 2014 train images `COCO_train2014_<12 digits>.jpg`; COCO 2017 ships the
same images as train2017/`<12 digits>.jpg`: either folder is accepted (locate_images).
"""
import collections
import concurrent.futures
import dataclasses
import json
import os
import pickle
import re

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# our name -> (folder under refer_root, split_by, splits)
DATASETS = {
    'refcoco': ('refcoco', 'unc', ('train', 'val', 'testA', 'testB')),
    'refcocop': ('refcoco+', 'unc', ('train', 'val', 'testA', 'testB')),
    'refcocog_umd': ('refcocog', 'umd', ('train', 'val', 'test')),
    'refcocog_google': ('refcocog', 'google', ('train', 'val')),
    'synthetic': ('synthetic', 'unc', ('train', 'val', 'testA', 'testB')),
}
# instances.json's name of a COCO 2014 train image; group 1: the 12 digits of its 2017 name.
COCO_TRAIN2014_NAME = re.compile(r'COCO_train2014_(\d{12})\.jpg')
IMAGE_NAME_FORMS = {'train2014': 'COCO_train2014_<12 digits>.jpg', 'train2017': '<12 digits>.jpg'}


@dataclasses.dataclass
class Problem:
  ref_id: int
  split: str
  reason: str      # 'missing annotation' | 'missing image' | 'unreadable image' | 'empty mask'
  detail: str


@dataclasses.dataclass
class Prepared:
  """The refs to write (per split, in order) and what they need from instances.json."""
  dataset: str
  refs_path: str
  refs: dict           # split -> [ref dict]
  annotations: dict    # ann_id -> annotation
  images: dict         # image_id -> image entry
  categories: dict     # category_id -> name
  image_root: str
  problems: list       # [Problem] of refs left out
  image_paths: dict    # image_id -> its file (locate_images)
  images_found: str    # which names the image folder holds (locate_images)


def paths(refer_root: str, dataset: str) -> tuple[str, str]:
  """(refs file, instances.json) of `dataset`."""
  if dataset not in DATASETS:
    raise ValueError(f'unknown dataset {dataset!r}; known: {sorted(DATASETS)}')
  folder, split_by, _ = DATASETS[dataset]
  return (os.path.join(refer_root, folder, f'refs({split_by}).p'),
          os.path.join(refer_root, folder, 'instances.json'))


def load_refs(refs_path: str, splits) -> list:
  """The refs of `refs_path`, each checked for the fields the data set needs."""
  if not os.path.isfile(refs_path):
    raise FileNotFoundError(f'refs file not found: {refs_path}')
  with open(refs_path, 'rb') as f:
    try:
      refs = pickle.load(f)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{refs_path}: not a readable pickle ({type(e).__name__}: {e})') from e
  if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
    raise ValueError(f'{refs_path}: expected a pickled list of dicts, got {type(refs).__name__}')
  if not refs:
    raise ValueError(f'{refs_path}: the list of refs is empty')
  for i, ref in enumerate(refs):
    missing = [k for k in ('ref_id', 'ann_id', 'image_id', 'split', 'sentences') if k not in ref]
    if missing:
      raise ValueError(f'{refs_path}: ref #{i} (ref_id={ref.get("ref_id")}) has no field(s) '
                       f'{missing}')
    if ref['split'] not in splits:
      raise ValueError(f'{refs_path}: ref_id={ref["ref_id"]} has split {ref["split"]!r}; '
                       f'expected one of {list(splits)}')
    if not ref['sentences']:
      raise ValueError(f'{refs_path}: ref_id={ref["ref_id"]} has no sentences')
    for j, sent in enumerate(ref['sentences']):
      text = sent.get('raw', sent.get('sent')) if isinstance(sent, dict) else None
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f'{refs_path}: ref_id={ref["ref_id"]} sentence {j} (sent_id='
                         f'{sent.get("sent_id") if isinstance(sent, dict) else None}) has an empty '
                         f'expression: {text!r}')
  return refs


def sentence_text(sent: dict) -> str:
  """The expression of one sentence entry: `raw` as LAVT reads it, else `sent`."""
  return sent.get('raw', sent.get('sent'))


# How a ref's mask is made from its annotation (data_prep.build --mask_rule):
MASK_RULES = {
    'union': "the union of the annotation's polygons (pycocotools' merge), or its RLE",
    # refer's getMask as LAVT reads it (data/dataset_refer_bert.py): the polygons decoded and
    # summed, then annot[ref_mask == 1] = 1: where two polygons overlap the pixel is background.
    'lavt': "refer's getMask, then == 1: pixels covered by exactly one polygon (LAVT)",
}


def annotation_mask(ann: dict, height: int, width: int, rule: str = 'union') -> np.ndarray:
  """(height, width) uint8 {0, 1} by MASK_RULES[rule]: the union of the annotation's polygons,
  or its RLE ('union'); LAVT's: the pixels of exactly one polygon ('lavt')."""
  if rule not in MASK_RULES:
    raise ValueError(f'mask rule {rule!r}: expected one of {sorted(MASK_RULES)}')
  seg = ann.get('segmentation')
  if not seg:
    raise ValueError(f'annotation {ann.get("id")}: empty segmentation {seg!r}')
  if isinstance(seg, list):                       # polygons
    if not all(isinstance(p, list) and len(p) >= 6 for p in seg):
      raise ValueError(f'annotation {ann.get("id")}: polygon with fewer than 3 points')
    polygons = mask_utils.frPyObjects(seg, height, width)
    if rule == 'lavt':
      m = mask_utils.decode(polygons).sum(axis=2)                       # (H, W): polygons per pixel
      return (m == 1).astype(np.uint8)
    rle = mask_utils.merge(polygons)
  elif isinstance(seg.get('counts'), list):       # uncompressed RLE
    rle = mask_utils.frPyObjects(seg, height, width)
  else:                                           # compressed RLE
    rle = dict(seg)
    if isinstance(rle['counts'], str):
      rle['counts'] = rle['counts'].encode('ascii')
  m = mask_utils.decode(rle)
  if m.shape != (height, width):
    raise ValueError(f'annotation {ann.get("id")}: segmentation of size {m.shape}, image is '
                     f'{(height, width)}')
  return m.astype(np.uint8)


def locate_images(image_root: str, file_names) -> tuple[dict, str]:
  """instances.json's file names -> ({file name: path under image_root}, what was found).

  COCO names (COCO_train2014_<12 digits>.jpg) are looked for as they are (a train2014/ folder)
  and as <12 digits>.jpg (train2017/, the same images): the form with more files there wins
  (train2014 on a tie). Other names (the synthetic set) are taken as they are. Errors: no folder,
  or a folder holding none of the COCO images in either form.
  """
  if not os.path.isdir(image_root):
    raise FileNotFoundError(f'image folder {image_root!r} does not exist')
  names = sorted(set(file_names))
  matches = [COCO_TRAIN2014_NAME.fullmatch(n) for n in names]
  if not names or not all(matches):
    return ({n: os.path.join(image_root, n) for n in names},
            f'images as instances.json names them, in {image_root}')
  forms = {'train2014': names, 'train2017': [m.group(1) + '.jpg' for m in matches]}
  found = {form: sum(os.path.isfile(os.path.join(image_root, f)) for f in files)
           for form, files in forms.items()}
  if not any(found.values()):
    raise ValueError(f'{image_root} holds none of the {len(names)} COCO images the refs need, '
                     f'neither as train2014 names ({IMAGE_NAME_FORMS["train2014"]}) nor as '
                     f'train2017 names ({IMAGE_NAME_FORMS["train2017"]}): give --images the '
                     'COCO train2014/ or train2017/ folder')
  form = max(forms, key=found.get)
  return ({n: os.path.join(image_root, f) for n, f in zip(names, forms[form])},
          f'COCO {form} names ({IMAGE_NAME_FORMS[form]}) in {image_root}: {found[form]} of '
          f'{len(names)} images there')


def _image_problem(path: str) -> str | None:
  """None when `path` decodes as an image, else why not."""
  if not os.path.isfile(path):
    return f'missing image file {path}'
  try:
    with Image.open(path) as im:
      im.load()
  except Exception as e:  # pylint: disable=broad-except
    return f'unreadable image {path} ({type(e).__name__}: {e})'
  return None


def prepare(refer_root: str, dataset: str, image_root: str, *, progress=None,
            num_threads: int | None = None) -> Prepared:
  """Reads `dataset` and checks every ref: annotation, image file, decodable image, non-empty mask.

  Refs that fail are listed in `problems` and left out of `refs`; layout errors (a refs file
  without a split, an empty expression, ...) raise ValueError. `progress(iterable, total, desc)`
  wraps the image check (e.g. tqdm).
  """
  refs_path, instances_path = paths(refer_root, dataset)
  _, _, splits = DATASETS[dataset]
  refs = load_refs(refs_path, splits)
  if not os.path.isfile(instances_path):
    raise FileNotFoundError(f'instances file not found: {instances_path}')
  with open(instances_path) as f:
    try:
      instances = json.load(f)
    except ValueError as e:   # an empty or cut file
      raise ValueError(f'{instances_path}: not readable JSON ({e})') from None
  for key in ('images', 'annotations'):
    if not isinstance(instances, dict) or not isinstance(instances.get(key), list):
      raise ValueError(f'{instances_path}: no {key!r} list')
  annotations = {a['id']: a for a in instances['annotations']}
  images = {im['id']: im for im in instances['images']}

  problems = []
  keep = []
  needed_images = {}
  for ref in refs:
    ann = annotations.get(ref['ann_id'])
    image = images.get(ref['image_id'])
    if ann is None:
      problems.append(Problem(ref['ref_id'], ref['split'], 'missing annotation',
                              f'ann_id={ref["ann_id"]} not in {instances_path}'))
    elif image is None:
      problems.append(Problem(ref['ref_id'], ref['split'], 'missing image',
                              f'image_id={ref["image_id"]} not in {instances_path}'))
    else:
      keep.append(ref)
      needed_images[image['id']] = image['file_name']
  paths_by_name, images_found = locate_images(image_root, needed_images.values())
  needed_images = {i: paths_by_name[name] for i, name in needed_images.items()}

  image_ids = sorted(needed_images)
  with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count()) as pool:
    results = pool.map(lambda i: _image_problem(needed_images[i]), image_ids)
    if progress is not None:
      results = progress(results, total=len(image_ids), desc=f'checking {dataset} images')
    image_errors = {i: e for i, e in zip(image_ids, results) if e is not None}

  by_split = collections.OrderedDict((s, []) for s in splits)
  for ref in keep:
    image = images[ref['image_id']]
    if ref['image_id'] in image_errors:
      err = image_errors[ref['image_id']]
      reason = 'missing image' if err.startswith('missing') else 'unreadable image'
      problems.append(Problem(ref['ref_id'], ref['split'], reason, err))
      continue
    try:
      m = annotation_mask(annotations[ref['ann_id']], image['height'], image['width'])
      empty = not m.any()
    except ValueError as e:
      problems.append(Problem(ref['ref_id'], ref['split'], 'empty mask', str(e)))
      continue
    if empty:
      problems.append(Problem(ref['ref_id'], ref['split'], 'empty mask',
                              f'annotation {ref["ann_id"]}: its mask has no foreground pixel'))
      continue
    by_split[ref['split']].append(ref)
  categories = {c['id']: c.get('name', '') for c in instances.get('categories', [])}
  return Prepared(dataset, refs_path, dict(by_split), annotations, images, categories, image_root,
                  problems, needed_images, images_found)


def report(prepared: Prepared, limit: int = 20) -> str:
  """Human-readable list of the problems, counted by reason."""
  if not prepared.problems:
    return f'{prepared.dataset}: no problems found'
  counts = collections.Counter(p.reason for p in prepared.problems)
  lines = [f'{prepared.dataset}: {len(prepared.problems)} ref(s) with problems: ' +
           ', '.join(f'{n} {r}' for r, n in sorted(counts.items()))]
  for p in prepared.problems[:limit]:
    lines.append(f'  ref_id={p.ref_id} ({p.split}): {p.reason}: {p.detail}')
  if len(prepared.problems) > limit:
    lines.append(f'  ... and {len(prepared.problems) - limit} more')
  return '\n'.join(lines)
