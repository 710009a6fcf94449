"""A procedurally generated referring-segmentation task, written in the refer layout.

`generate` (the command: `python -m data_prep.synthetic --out=DIR --num_images=N --seed=S`) writes `<out>/synthetic/refs(unc).p`, `<out>/synthetic/instances.json` (polygon and RLE
segmentations) and `<out>/images/*.jpg`, so that `data_prep.build --dataset=synthetic
--refer_root=<out> --images=<out>/images` builds it like RefCOCO.

Each image holds 2-5 shapes (circle, square, triangle, diamond) of four colours and two clearly
distinct sizes on a textured background, never overlapping. Every expression is a small program
(attribute filter, optional relation to an anchor, optional superlative) rendered to text; it is kept
only if evaluating it against all shapes of the image selects its target and nothing else. Targets
whose kind another shape shares are preferred, so that the kind alone is ambiguous in most refs.
"""
import dataclasses
import json
import os
import pickle
import re

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

KINDS = ('circle', 'square', 'triangle', 'diamond')      # category ids 1..4
COLOURS = {'red': (215, 40, 40), 'green': (40, 165, 60), 'blue': (45, 75, 220),
           'yellow': (235, 205, 35)}
SIZES = {'small': (8.0, 10.0), 'large': (17.0, 21.0)}    # circumradius range in pixels at 128²
RELATIONS = ('left of', 'right of', 'above', 'below')
EXTREMES = ('top', 'bottom', 'left', 'right', 'largest', 'smallest')
SPLIT_FRACTIONS = (('train', 0.8), ('val', 0.1), ('testA', 0.05), ('testB', 0.05))
_MARGIN = 6.0       # pixels a relation / position extreme must clear to count


@dataclasses.dataclass
class Shape:
  kind: str
  colour: str
  size: str
  cx: float
  cy: float
  radius: float


@dataclasses.dataclass(frozen=True)
class Phrase:
  """A noun phrase: the attributes it names (None = not named)."""
  kind: str | None = None
  colour: str | None = None
  size: str | None = None


@dataclasses.dataclass(frozen=True)
class Expression:
  """target phrase [relation anchor phrase] or [extreme]."""
  target: Phrase
  relation: str | None = None
  anchor: Phrase | None = None
  extreme: str | None = None


# ------------------------------------------------------------------ semantics


def _phrase_matches(p: Phrase, s: Shape) -> bool:
  return ((p.kind is None or p.kind == s.kind) and (p.colour is None or p.colour == s.colour)
          and (p.size is None or p.size == s.size))


def _related(rel: str, a: Shape, b: Shape) -> bool:
  """`a` is `rel` `b` (image y grows downwards)."""
  if rel == 'left of':
    return a.cx < b.cx - _MARGIN
  if rel == 'right of':
    return a.cx > b.cx + _MARGIN
  if rel == 'above':
    return a.cy < b.cy - _MARGIN
  if rel == 'below':
    return a.cy > b.cy + _MARGIN
  raise ValueError(f'unknown relation {rel!r}')


def _extreme(ext: str, candidates: list[int], shapes: list[Shape]) -> list[int]:
  """The candidates that are the clear extreme ([] when the extreme is not clear)."""
  if ext in ('largest', 'smallest'):
    want = 'large' if ext == 'largest' else 'small'
    hits = [i for i in candidates if shapes[i].size == want]
    return hits if len(hits) == 1 and len(candidates) > 1 else []
  key = {'top': lambda s: s.cy, 'bottom': lambda s: -s.cy,
         'left': lambda s: s.cx, 'right': lambda s: -s.cx}[ext]
  ranked = sorted(candidates, key=lambda i: key(shapes[i]))
  if len(ranked) < 2 or key(shapes[ranked[1]]) - key(shapes[ranked[0]]) < _MARGIN:
    return []
  return ranked[:1]


def evaluate(expr: Expression, shapes: list[Shape]) -> list[int]:
  """Indices of the shapes that `expr` denotes."""
  candidates = [i for i, s in enumerate(shapes) if _phrase_matches(expr.target, s)]
  if expr.relation is not None:
    anchors = [j for j, s in enumerate(shapes) if _phrase_matches(expr.anchor, s)]
    if len(anchors) != 1:
      return []      # "the X left of the Y" needs exactly one Y
    candidates = [i for i in candidates
                  if i != anchors[0] and _related(expr.relation, shapes[i], shapes[anchors[0]])]
  if expr.extreme is not None:
    candidates = _extreme(expr.extreme, candidates, shapes)
  return candidates


# ------------------------------------------------------------------ text


def _phrase_text(p: Phrase) -> str:
  words = [w for w in (p.size, p.colour) if w] + [p.kind or 'shape']
  return ' '.join(words)


def render(expr: Expression, style: int = 0) -> str:
  """Text of `expr`; `style` picks among equivalent phrasings."""
  np_text = _phrase_text(expr.target)
  if expr.relation is not None:
    rel = expr.relation if style % 2 == 0 or expr.relation in ('above', 'below') else (
        'to the ' + expr.relation.replace(' of', '') + ' of')
    return f'the {np_text} {rel} the {_phrase_text(expr.anchor)}'
  if expr.extreme in ('largest', 'smallest'):
    p = dataclasses.replace(expr.target, size=None)
    return f'the {expr.extreme} {_phrase_text(p)}'
  if expr.extreme is not None:
    if style % 2 == 0:
      return f'the {np_text} at the {expr.extreme}'
    word = {'top': 'topmost', 'bottom': 'bottom', 'left': 'leftmost', 'right': 'rightmost'}
    return f'the {word[expr.extreme]} {np_text}'
  return f'the {np_text}' if style % 2 == 0 else np_text


_PHRASE_RE = (r'(?:(?P<{p}size>small|large) )?(?:(?P<{p}colour>' + '|'.join(COLOURS) +
              r') )?(?P<{p}kind>' + '|'.join(KINDS) + r'|shape)')


def _phrase_from(m: re.Match, prefix: str) -> Phrase:
  kind = m.group(prefix + 'kind')
  return Phrase(kind=None if kind == 'shape' else kind, colour=m.group(prefix + 'colour'),
                size=m.group(prefix + 'size'))


def parse(text: str) -> Expression:
  """Inverse of `render` (raises ValueError on text outside the grammar)."""
  t, a = _PHRASE_RE.format(p='t'), _PHRASE_RE.format(p='a')
  m = re.fullmatch(rf'(?:the )?{t} (?:to the )?(?P<rel>left|right|above|below)(?: of)? the {a}', text)
  if m:
    rel = m.group('rel') + (' of' if m.group('rel') in ('left', 'right') else '')
    return Expression(_phrase_from(m, 't'), relation=rel, anchor=_phrase_from(m, 'a'))
  m = re.fullmatch(rf'the (?P<ext>largest|smallest) {t}', text)
  if m:
    return Expression(_phrase_from(m, 't'), extreme=m.group('ext'))
  m = re.fullmatch(rf'the {t} at the (?P<ext>top|bottom|left|right)', text)
  if m:
    return Expression(_phrase_from(m, 't'), extreme=m.group('ext'))
  m = re.fullmatch(rf'the (?P<ext>topmost|bottom|leftmost|rightmost) {t}', text)
  if m:
    ext = {'topmost': 'top', 'bottom': 'bottom', 'leftmost': 'left', 'rightmost': 'right'}
    return Expression(_phrase_from(m, 't'), extreme=ext[m.group('ext')])
  m = re.fullmatch(rf'(?:the )?{t}', text)
  if m:
    return Expression(_phrase_from(m, 't'))
  raise ValueError(f'expression outside the synthetic grammar: {text!r}')


def _candidate_expressions(target: int, shapes: list[Shape]) -> list[Expression]:
  """Every expression of the grammar that denotes exactly `shapes[target]`, by family."""
  s = shapes[target]
  phrases = [Phrase(kind=k, colour=c, size=z)
             for k in (s.kind, None) for c in (s.colour, None) for z in (s.size, None)]
  found = {'attribute': [], 'extreme': [], 'relation': []}
  for p in phrases:
    e = Expression(p)
    if evaluate(e, shapes) == [target]:
      found['attribute'].append(e)
    for ext in EXTREMES:
      pe = dataclasses.replace(p, size=None) if ext in ('largest', 'smallest') else p
      e = Expression(pe, extreme=ext)
      if evaluate(e, shapes) == [target] and e not in found['extreme']:
        found['extreme'].append(e)
  for j, a in enumerate(shapes):
    if j == target:
      continue
    # The anchor phrase: its shortest unique description.
    anchor_phrases = [Phrase(kind=a.kind, colour=a.colour), Phrase(colour=a.colour),
                      Phrase(kind=a.kind), Phrase(kind=a.kind, colour=a.colour, size=a.size)]
    anchor = next((q for q in anchor_phrases if evaluate(Expression(q), shapes) == [j]), None)
    if anchor is None:
      continue
    for rel in RELATIONS:
      for p in (Phrase(kind=s.kind), Phrase(colour=s.colour), Phrase(kind=s.kind, colour=s.colour)):
        e = Expression(p, relation=rel, anchor=anchor)
        if evaluate(e, shapes) == [target]:
          found['relation'].append(e)
  return found


# ------------------------------------------------------------------ drawing


def _polygon(s: Shape) -> np.ndarray:
  """(K, 2) float vertices (x, y) of the shape's outline."""
  if s.kind == 'circle':
    angles = np.linspace(0.0, 2 * np.pi, 24, endpoint=False)
  elif s.kind == 'square':
    angles = np.pi / 4 + np.arange(4) * np.pi / 2
  elif s.kind == 'diamond':
    angles = np.arange(4) * np.pi / 2
    return np.stack([s.cx + np.cos(angles) * s.radius,
                     s.cy + np.sin(angles) * s.radius * 1.25], axis=1)
  elif s.kind == 'triangle':
    angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
  else:
    raise ValueError(f'unknown shape kind {s.kind!r}')
  return np.stack([s.cx + np.cos(angles) * s.radius, s.cy + np.sin(angles) * s.radius], axis=1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """(size, size, 3) float: a muted base colour, smooth blotches and pixel noise."""
  base = rng.uniform(95, 175) + rng.uniform(-20, 20, size=3)
  coarse = rng.normal(0.0, 12.0, size=(size // 16, size // 16, 1))
  blotches = np.asarray(Image.fromarray(coarse[..., 0].astype(np.float32)).resize(
      (size, size), Image.BICUBIC))[..., None]
  img = base + blotches + rng.normal(0.0, 5.0, size=(size, size, 3))
  if rng.random() < 0.3:     # faint stripes
    period = rng.integers(6, 14)
    stripes = (np.arange(size) // period % 2) * rng.uniform(6, 14)
    img += stripes[None, :, None] if rng.random() < 0.5 else stripes[:, None, None]
  return img


def _place_shapes(rng: np.random.Generator, size: int, count: int) -> list[Shape]:
  """`count` shapes (fewer when placement fails) that do not overlap."""
  shapes = []
  # Draw kinds from a small pool so that kinds repeat within an image (kind-ambiguous refs).
  pool = list(rng.choice(KINDS, size=rng.integers(1, 4), replace=False))
  for _ in range(count):
    for _ in range(50):
      sz = 'large' if rng.random() < 0.5 else 'small'
      r = rng.uniform(*SIZES[sz])
      reach = r * 1.25
      cx, cy = rng.uniform(reach + 2, size - reach - 2, size=2)
      if all(np.hypot(cx - o.cx, cy - o.cy) > reach + o.radius * 1.25 + 3 for o in shapes):
        kind = str(rng.choice(pool)) if rng.random() < 0.8 else str(rng.choice(KINDS))
        shapes.append(Shape(kind, str(rng.choice(list(COLOURS))), sz, float(cx), float(cy), float(r)))
        break
  return shapes


def _draw(rng, size, shapes):
  """The image (uint8) and, per shape, its polygon (COCO flat list) and its exact mask."""
  img = _background(rng, size)
  polygons, masks = [], []
  for s in shapes:
    poly = _polygon(s).round(2).reshape(-1).tolist()
    m = mask_utils.decode(mask_utils.frPyObjects([poly], size, size))[..., 0]   # (H, W) uint8
    colour = np.asarray(COLOURS[s.colour], np.float32) + rng.uniform(-15, 15)
    img = np.where(m[..., None] > 0, colour + rng.normal(0.0, 6.0, size=img.shape), img)
    polygons.append(poly)
    masks.append(m)
  return np.clip(img, 0, 255).astype(np.uint8), polygons, masks


# ------------------------------------------------------------------ data set


def _split_names(num_images: int, rng: np.random.Generator) -> list[str]:
  """One split per image, about 80/10/5/5, each split non-empty when num_images >= 4."""
  counts = {name: max(1, int(round(frac * num_images))) for name, frac in SPLIT_FRACTIONS[1:]}
  counts['train'] = num_images - sum(counts.values())
  if counts['train'] < 1:
    raise ValueError(f'num_images={num_images}: need at least 4 images (one per split)')
  names = [n for n, _ in SPLIT_FRACTIONS for _ in range(counts[n])]
  return [names[i] for i in rng.permutation(num_images)]


def _segmentation(poly, mask, style):
  """The annotation's segmentation as a polygon, an uncompressed RLE or a compressed RLE."""
  if style == 'polygon':
    return [poly], 0
  rle = mask_utils.encode(np.asfortranarray(mask))
  if style == 'rle':
    counts = rle['counts'].decode('ascii')
    return {'size': list(rle['size']), 'counts': counts}, 1
  # Uncompressed RLE (COCO's iscrowd form): run lengths starting with background.
  flat = mask.reshape(-1, order='F')
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  runs = np.diff(bounds).tolist()
  if flat[0] == 1:
    runs = [0] + runs
  return {'size': list(mask.shape), 'counts': runs}, 1


def generate(out_dir: str, num_images: int, seed: int, *, image_size: int = 128,
             max_refs_per_image: int = 3, jpeg_quality: int = 90,
             family_weights=(('attribute', 0.5), ('extreme', 0.3), ('relation', 0.2))) -> dict:
  """Writes the synthetic data set under `out_dir`; returns {split: number of refs}.

  family_weights: how often a sentence is drawn from each expression family (among the families
  that can describe the target): attributes only, a superlative / position, a relation.
  """
  family_weights = dict(family_weights)
  rng = np.random.default_rng(seed)
  ann_dir = os.path.join(out_dir, 'synthetic')
  image_dir = os.path.join(out_dir, 'images')
  os.makedirs(ann_dir, exist_ok=True)
  os.makedirs(image_dir, exist_ok=True)
  splits = _split_names(num_images, rng)
  images, annotations, refs = [], [], []
  next_ann, next_ref, next_sent = 1, 1, 1
  for image_index in range(num_images):
    image_id = image_index + 1
    while True:    # at least one shape with a unique description
      shapes = _place_shapes(rng, image_size, int(rng.integers(2, 6)))
      options = [_candidate_expressions(i, shapes) for i in range(len(shapes))]
      describable = [i for i, o in enumerate(options) if any(o.values())]
      if describable:
        break
    pixels, polygons, masks = _draw(rng, image_size, shapes)
    file_name = f'synthetic_{image_id:06d}.jpg'
    Image.fromarray(pixels).save(os.path.join(image_dir, file_name), quality=jpeg_quality)
    images.append({'id': image_id, 'file_name': file_name, 'height': image_size, 'width': image_size})

    ann_ids = []
    for s, poly, m in zip(shapes, polygons, masks):
      style = ('polygon', 'polygon', 'rle', 'rle_uncompressed')[int(rng.integers(4))]
      seg, iscrowd = _segmentation(poly, m, style)
      x0, y0 = np.min(np.reshape(poly, (-1, 2)), 0)
      x1, y1 = np.max(np.reshape(poly, (-1, 2)), 0)
      annotations.append({
          'id': next_ann, 'image_id': image_id, 'category_id': KINDS.index(s.kind) + 1,
          'segmentation': seg, 'iscrowd': iscrowd, 'area': float(m.sum()),
          'bbox': [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
          # extra fields: the generator's ground truth (the tests check them against the pixels)
          'colour': s.colour, 'size': s.size, 'center': [s.cx, s.cy]})
      ann_ids.append(next_ann)
      next_ann += 1

    kind_count = {k: sum(o.kind == k for o in shapes) for k in KINDS}
    # Kind-ambiguous targets first, then the rest, in a random order.
    order = sorted(describable, key=lambda i: (kind_count[shapes[i].kind] < 2, rng.random()))
    for i in order[:max_refs_per_image]:
      family_pool = [f for f, exprs in options[i].items() if exprs]
      weights = np.asarray([family_weights[f] for f in family_pool], np.float64)
      sentences = []
      for _ in range(int(rng.integers(1, 4))):
        family = family_pool[int(rng.choice(len(family_pool), p=weights / weights.sum()))]
        exprs = options[i][family]
        text = render(exprs[int(rng.integers(len(exprs)))], style=int(rng.integers(2)))
        if text not in [t['raw'] for t in sentences]:
          sentences.append({'raw': text, 'sent': text, 'tokens': text.split(), 'sent_id': next_sent})
          next_sent += 1
      refs.append({'ref_id': next_ref, 'ann_id': ann_ids[i], 'image_id': image_id,
                   'split': splits[image_index], 'category_id': KINDS.index(shapes[i].kind) + 1,
                   'file_name': f'synthetic_{image_id:06d}_{ann_ids[i]}.jpg',
                   'sentences': sentences, 'sent_ids': [t['sent_id'] for t in sentences]})
      next_ref += 1

  categories = [{'id': i + 1, 'name': k, 'supercategory': 'shape'} for i, k in enumerate(KINDS)]
  with open(os.path.join(ann_dir, 'instances.json'), 'w') as f:
    json.dump({'images': images, 'annotations': annotations, 'categories': categories}, f)
  with open(os.path.join(ann_dir, 'refs(unc).p'), 'wb') as f:
    pickle.dump(refs, f)
  counts = {}
  for r in refs:
    counts[r['split']] = counts.get(r['split'], 0) + 1
  return counts

