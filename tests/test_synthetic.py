"""The synthetic referring task: deterministic, refer layout, and every expression unique."""
import collections
import os
import pickle
import subprocess
import sys

import numpy as np
from PIL import Image
from pycocotools import coco as coco_api
import pytest

from eavl_jax.data import synthetic
from tools import synthetic_ceiling
from tools import synthetic_errors
from tools import synthetic_probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Area of a shape of circumradius r, over r² (geometry of synthetic._polygon's outlines).
_AREA_OVER_R2 = {'circle': np.pi, 'square': 2.0, 'triangle': 3 * np.sqrt(3) / 4, 'diamond': 2.5}


def _load(out):
  with open(os.path.join(out, 'synthetic', 'refs(unc).p'), 'rb') as f:
    refs = pickle.load(f)
  coco = coco_api.COCO(os.path.join(out, 'synthetic', 'instances.json'))
  return refs, coco


def _run_tool(module, tiny_trained, synthetic_raw, *flags):
  """`python -m tools.<module>` on the tiny trained model and its raw data."""
  c = tiny_trained.config()
  return subprocess.run(
      [sys.executable, '-m', f'tools.{module}', '--config=configs/tiny.py',
       f'--config.data.data_dir={c.data.data_dir}', f'--workdir={tiny_trained.workdir}',
       f'--raw_dir={synthetic_raw}', *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
  files = {}
  for name, seed in (('a', 3), ('b', 3), ('c', 4)):
    out = tmp_path / name
    synthetic.generate(str(out), 5, seed)
    files[name] = {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file()}
  assert files['a'] == files['b']
  assert files['a'] != files['c']


def test_layout_and_splits(synthetic_raw):
  refs, coco = _load(synthetic_raw)
  for ref in refs:
    assert {'ref_id', 'ann_id', 'image_id', 'split', 'sentences', 'sent_ids', 'category_id',
            'file_name'} <= set(ref)
    assert 1 <= len(ref['sentences']) <= 3
    assert [s['sent_id'] for s in ref['sentences']] == ref['sent_ids']
    for s in ref['sentences']:
      assert s['raw'] and s['tokens'] == s['raw'].split()
    assert coco.anns[ref['ann_id']]['image_id'] == ref['image_id']
    assert coco.anns[ref['ann_id']]['category_id'] == ref['category_id']
    image = coco.imgs[ref['image_id']]
    with Image.open(os.path.join(synthetic_raw, 'images', image['file_name'])) as im:
      assert im.format == 'JPEG' and im.size == (image['width'], image['height'])
  split_of_image = collections.defaultdict(set)
  for ref in refs:
    split_of_image[ref['image_id']].add(ref['split'])
  assert all(len(s) == 1 for s in split_of_image.values()), 'an image in two splits'
  assert set().union(*split_of_image.values()) == {'train', 'val', 'testA', 'testB'}
  kinds = collections.Counter()
  for ann in coco.anns.values():
    seg = ann['segmentation']
    kinds['polygon' if isinstance(seg, list) else
          'rle' if isinstance(seg['counts'], str) else 'rle_uncompressed'] += 1
  assert set(kinds) == {'polygon', 'rle', 'rle_uncompressed'}


def test_annotations_agree_with_pixels(synthetic_raw):
  """Recorded colour, size and centre match the image and the mask decoded by pycocotools."""
  _, coco = _load(synthetic_raw)
  palette = np.asarray(list(synthetic.COLOURS.values()), np.float32)
  names = list(synthetic.COLOURS)
  for ann in coco.anns.values():
    image = coco.imgs[ann['image_id']]
    pixels = np.asarray(Image.open(os.path.join(synthetic_raw, 'images', image['file_name'])),
                        np.float32)
    m = coco.annToMask(ann).astype(bool)
    kind = coco.cats[ann['category_id']]['name']
    ys, xs = np.nonzero(m)
    assert abs(xs.mean() + 0.5 - ann['center'][0]) < 1.0 and abs(ys.mean() + 0.5 - ann['center'][1]) < 1.0
    radius = np.sqrt(m.sum() / _AREA_OVER_R2[kind])
    assert (radius > 13.5) == (ann['size'] == 'large'), (ann['id'], radius, ann['size'])
    inner = m & np.roll(m, 2, 0) & np.roll(m, -2, 0) & np.roll(m, 2, 1) & np.roll(m, -2, 1)
    mean_colour = pixels[inner].mean(0)
    assert names[int(np.argmin(np.abs(palette - mean_colour).sum(1)))] == ann['colour']


def _shapes_from_files(coco, image_id):
  anns = coco.imgToAnns[image_id]
  shapes = [synthetic.Shape(coco.cats[a['category_id']]['name'], a['colour'], a['size'],
                            a['center'][0], a['center'][1], 0.0) for a in anns]
  return shapes, [a['id'] for a in anns]


def test_every_expression_denotes_its_target_alone(synthetic_raw):
  refs, coco = _load(synthetic_raw)
  families = collections.Counter()
  for ref in refs:
    shapes, ann_ids = _shapes_from_files(coco, ref['image_id'])
    for s in ref['sentences']:
      expr = synthetic.parse(s['raw'])
      assert synthetic.render(expr) == synthetic.render(synthetic.parse(synthetic.render(expr)))
      assert [ann_ids[i] for i in synthetic.evaluate(expr, shapes)] == [ref['ann_id']], s['raw']
      families['relation' if expr.relation else 'extreme' if expr.extreme else 'attribute'] += 1
  assert set(families) == {'attribute', 'extreme', 'relation'}


def test_kind_alone_is_ambiguous_in_most_refs(tmp_path):
  synthetic.generate(str(tmp_path), 40, 1)
  refs, coco = _load(str(tmp_path))
  ambiguous = [sum(a['category_id'] == r['category_id'] for a in coco.imgToAnns[r['image_id']]) > 1
               for r in refs]
  assert np.mean(ambiguous) >= 0.5


def test_parse_rejects_text_outside_the_grammar():
  with pytest.raises(ValueError, match='outside the synthetic grammar'):
    synthetic.parse('the purple hexagon')


def test_error_breakdown_runs_on_a_trained_model(tiny_trained, synthetic_raw):
  assert synthetic_errors.family(synthetic.parse('the leftmost red square')) == (
      'superlative / position (position: colour+kind)')
  assert synthetic_errors.family(synthetic.parse('the largest shape')) == (
      'superlative / position (size: none)')
  assert synthetic_errors.family(synthetic.parse('the small circle')) == 'attributes (size+kind)'
  assert synthetic_errors.family(synthetic.parse('the square above the blue circle')) == 'relation'
  result = _run_tool('synthetic_errors', tiny_trained, synthetic_raw,
                     f'--config.data.eval_max_size={tiny_trained.eval_max_size}')
  assert result.returncode == 0, result.stderr[-2000:]
  width = synthetic_errors.NAME_WIDTH
  rows = {line[:width].strip(): line[width:].split() for line in result.stdout.splitlines()[2:]}
  with open(os.path.join(synthetic_raw, 'synthetic', 'refs(unc).p'), 'rb') as f:
    val_sentences = sum(len(r['sentences']) for r in pickle.load(f) if r['split'] == 'val')
  assert int(rows['all'][0]) == val_sentences > 0
  families = [k for k in rows if k in ('attributes', 'relation', 'superlative / position')]
  assert sum(int(rows[k][0]) for k in families) == val_sentences
  assert all(0.0 <= float(v[1]) <= 1.0 and 0.0 <= float(v[4]) <= 1.0 for v in rows.values())
  assert result.stdout.splitlines()[1].split()[-1] == 'select'
  missing = _run_tool('synthetic_errors', tiny_trained, synthetic_raw, '--checkpoint=77')
  assert missing.returncode != 0 and 'no checkpoint of step 77' in missing.stderr.splitlines()[-1]
  assert 'Traceback' not in missing.stderr


def test_selects_target_is_the_best_overlapping_shape():
  shapes = [np.zeros((8, 8), bool) for _ in range(3)]
  shapes[0][:2, :2] = shapes[1][4:, 4:] = shapes[2][:2, 5:] = True
  pred = shapes[1].copy()
  pred[:1, :1] = True                        # a stray pixel on shape 0 does not change the choice
  assert synthetic_errors.selects_target(pred, shapes, 1)
  assert not synthetic_errors.selects_target(pred, shapes, 0)
  split = shapes[0] | shapes[2]              # a mask over two shapes selects the better covered
  split[0, 0] = False
  assert synthetic_errors.selects_target(split, shapes, 2)
  assert not synthetic_errors.selects_target(np.zeros((8, 8), bool), shapes, 0)   # empty: none


def test_probe_accuracy_separable_and_random_labels():
  rng = np.random.default_rng(0)
  labels = list(rng.integers(0, 3, 400))
  separable = np.eye(3)[labels] + 0.1 * rng.normal(size=(400, 3))
  acc, majority = synthetic_probe.probe_accuracy(separable, labels)
  assert acc == 1.0 and majority < 0.5
  acc, _ = synthetic_probe.probe_accuracy(rng.normal(size=(400, 3)), labels)   # nothing to find
  assert acc < 0.6


def test_expression_labels_name_what_the_expression_says():
  assert synthetic_probe.expression_labels('the small red circle') == {
      'colour': 'red', 'kind': 'circle', 'size': 'small', 'extreme': 'none', 'relation': 'none'}
  assert synthetic_probe.expression_labels('the leftmost shape') == {
      'colour': 'none', 'kind': 'none', 'size': 'none', 'extreme': 'left', 'relation': 'none'}
  assert synthetic_probe.expression_labels('the blue square to the left of the green circle') == {
      'colour': 'blue', 'kind': 'square', 'size': 'none', 'extreme': 'none', 'relation': 'left of'}


def test_attention_spread_uniform_and_distinct_queries():
  text_mask = np.array([[1, 1, 1, 1, 0, 0]])                # 4 words, 2 padding
  uniform = np.zeros((1, 3, 6))
  uniform[:, :, :4] = 0.25                                  # three identical uniform queries
  assert np.allclose(synthetic_probe.attention_spread(uniform, text_mask), (1.0, 0.0))
  distinct = np.zeros((1, 3, 6))
  distinct[0, [0, 1, 2], [0, 1, 3]] = 1.0                   # each query on its own word
  assert np.allclose(synthetic_probe.attention_spread(distinct, text_mask), (0.0, 1.0))


def test_positive_channels_counts_channels_positive_anywhere():
  a = np.zeros((2, 3, 4, 5))
  a[1, 2, 3, 0] = 0.5            # channel 0 positive at one position of one sample
  a[0, 0, 0, 3] = 2.0            # channel 3 too
  a[:, :, :, 4] = -1.0           # negative values are not alive (pre-ReLU inputs would be)
  assert synthetic_probe.positive_channels(a).tolist() == [True, False, False, True, False]


def test_probe_runs_on_a_trained_model(tiny_trained, synthetic_raw):
  result = _run_tool('synthetic_probe', tiny_trained, synthetic_raw)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  rows = [line.split() for line in lines[2:8]]
  assert [(r[0], r[1]) for r in rows] == [(a, l) for a in ('kind', 'colour', 'size')
                                          for l in ('S/8', 'S/16')]
  assert all(0.0 <= float(r[2]) <= 1.0 and 0.0 < float(r[3]) <= 1.0 for r in rows)
  assert 'word attention' in lines[9]
  entropy, distance = map(float, lines[11].split())
  assert 0.0 <= entropy <= 1.0 and 0.0 <= distance <= 1.0
  assert 'language code' in lines[13]
  code_rows = [line.split() for line in lines[15:20]]
  assert [r[0] for r in code_rows] == ['colour', 'kind', 'size', 'extreme', 'relation']
  assert all(0.0 <= float(v) <= 1.0 for r in code_rows for v in r[1:])
  assert 'live units' in lines[21]
  unit_rows = {r[0]: (int(r[1]), int(r[2])) for r in (line.split() for line in lines[23:])}
  c = 32                                               # tiny.py's hidden_dim (the test model)
  assert unit_rows['neck/v4'][1] == c and unit_rows['neck/m3'][1] == c // 2
  assert {'neck/tg', 'query_generator/vd', 'query_generator/dense_neck/v4'} <= set(unit_rows)
  assert 'query_generator' not in unit_rows          # the sown word attention is no projection
  assert all(0 <= live <= total for live, total in unit_rows.values())
  missing = _run_tool('synthetic_probe', tiny_trained, synthetic_raw, '--checkpoint=77')
  assert missing.returncode != 0 and 'no checkpoint of step 77' in missing.stderr.splitlines()[-1]


def test_upsampled_map_ceiling_exact_for_cell_aligned_masks_and_falls_with_resolution():
  aligned = np.zeros((32, 32), np.uint8)
  aligned[8:24, 8:24] = 1          # whole 4x4 cells of an 8² map
  assert synthetic_ceiling.upsampled_iou(aligned, 32, 'area') == 1.0
  assert synthetic_ceiling.upsampled_iou(aligned, 32, 'nearest') == 1.0
  # a disc of radius 4 px: a 4² map (8 px cells) holds it far worse than a 16² one
  yy, xx = np.mgrid[:32, :32]
  disc = (((yy - 13.3) ** 2 + (xx - 17.6) ** 2) <= 16).astype(np.uint8)
  fine, coarse = (synthetic_ceiling.upsampled_iou(disc, g, 'area') for g in (16, 4))
  assert fine > 0.8 and coarse < fine - 0.3
  table = synthetic_ceiling.ceilings(num_images=4, seed=0, image_size=128, grids=(32, 8))
  assert {k[0] for k in table} == {'small', 'large'} and {k[1] for k in table} == {32, 8}
  for size in ('small', 'large'):
    assert table[(size, 32, 'area')] > table[(size, 8, 'area')]
