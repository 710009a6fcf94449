"""Building eavl_refer records from the refer layout, and the build's checks of bad input."""
import collections
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
from pycocotools import coco as coco_api
import pytest

from eavl_jax.data import build
from eavl_jax.data import refer_tfds
from eavl_jax import input_pipeline
from configs import tiny

_quiet = lambda *a: None


def _source(raw):
  with open(os.path.join(raw, 'synthetic', 'refs(unc).p'), 'rb') as f:
    refs = pickle.load(f)
  return refs, coco_api.COCO(os.path.join(raw, 'synthetic', 'instances.json'))


def _copy(raw, tmp_path):
  out = tmp_path / 'raw'
  shutil.copytree(raw, out)
  return str(out)


def _edit_refs(raw, edit):
  path = os.path.join(raw, 'synthetic', 'refs(unc).p')
  with open(path, 'rb') as f:
    refs = pickle.load(f)
  edit(refs)
  with open(path, 'wb') as f:
    pickle.dump(refs, f)


def _build(raw, data_dir, **kwargs):
  return build.build('synthetic', raw, os.path.join(raw, 'images'), str(data_dir), log=_quiet,
                     **kwargs)


def test_records_match_the_source(synthetic_raw, synthetic_records):
  refs, coco = _source(synthetic_raw)
  builder = refer_tfds.EavlRefer(config='synthetic', data_dir=synthetic_records)
  per_split = collections.Counter(r['split'] for r in refs)
  assert {s: builder.info.splits[s].num_examples for s in per_split} == dict(per_split)
  by_ref_id = {r['ref_id']: r for r in refs}
  seen = set()
  for split in per_split:
    source = builder.as_data_source(split)
    for i in range(len(source)):
      ex = source[i]
      ref = by_ref_id[int(ex['ref_id'])]
      ann = coco.anns[ref['ann_id']]
      image = coco.imgs[ref['image_id']]
      assert ref['split'] == split
      assert (int(ex['ann_id']), int(ex['image_id']), int(ex['category_id'])) == (
          ref['ann_id'], ref['image_id'], ref['category_id'])
      assert [s.decode() for s in ex['sentences']] == [s['raw'] for s in ref['sentences']]
      assert list(ex['sentence_ids']) == ref['sent_ids']
      np.testing.assert_array_equal(ex['bbox'], np.float32(ann['bbox']))
      assert ex['category'].decode() == coco.cats[ref['category_id']]['name']
      with open(os.path.join(synthetic_raw, 'images', image['file_name']), 'rb') as f:
        assert ex['image'] == f.read()            # stored as is without resize_to
      mask = input_pipeline.decode_mask(ex['mask'])
      assert (int(ex['height']), int(ex['width'])) == mask.shape
      np.testing.assert_array_equal(mask, coco.annToMask(ann))
      seen.add(int(ex['ref_id']))
  assert seen == set(by_ref_id)


def test_resize_to_stores_square_images_and_original_masks(synthetic_raw, tmp_path):
  counts = _build(synthetic_raw, tmp_path, resize_to=48)
  builder = refer_tfds.EavlRefer(config='synthetic', data_dir=str(tmp_path))
  assert builder.info.metadata['resize_to'] == 48
  ex = builder.as_data_source('val')[0]
  assert Image.open(io.BytesIO(ex['image'])).size == (48, 48)
  assert input_pipeline.decode_mask(ex['mask']).shape == (int(ex['height']), int(ex['width']))
  refs, _ = _source(synthetic_raw)
  assert counts['val']['refs'] == sum(r['split'] == 'val' for r in refs)


def test_build_and_read_without_tensorflow(synthetic_raw, tmp_path):
  """A fresh process builds the records and reads them back without ever importing TensorFlow."""
  code = f"""
import sys
from eavl_jax.data import build, refer_tfds
build.build('synthetic', {synthetic_raw!r}, {synthetic_raw!r} + '/images', {str(tmp_path)!r},
            log=lambda *a: None)
ex = refer_tfds.EavlRefer(config='synthetic', data_dir={str(tmp_path)!r}).as_data_source('train')[0]
assert ex['image'][:2] == b'\\xff\\xd8'
assert not [m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.')]
print('ok')
"""
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
  assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-3000:]


# ------------------------------------------------------------------ bad input


def _first_ref(raw):
  refs, coco = _source(raw)
  ref = next(r for r in refs if r['split'] == 'train')
  return ref, coco


def test_missing_image_is_listed_and_fails_unless_allowed(synthetic_raw, tmp_path):
  raw = _copy(synthetic_raw, tmp_path)
  ref, coco = _first_ref(raw)
  path = os.path.join(raw, 'images', coco.imgs[ref['image_id']]['file_name'])
  os.remove(path)
  with pytest.raises(ValueError, match='missing image') as e:
    _build(raw, tmp_path / 'records')
  assert path in str(e.value) and f'ref_id={ref["ref_id"]}' in str(e.value)
  assert not (tmp_path / 'records' / 'eavl_refer').exists()

  refs, _ = _source(raw)
  on_image = [r for r in refs if r['image_id'] == ref['image_id']]
  counts = _build(raw, tmp_path / 'records', allow_missing=True)
  assert counts['dropped'] == len(on_image)
  assert counts['train']['refs'] == sum(r['split'] == 'train' for r in refs) - len(on_image)
  builder = refer_tfds.EavlRefer(config='synthetic', data_dir=str(tmp_path / 'records'))
  assert builder.info.splits['train'].num_examples == counts['train']['refs']


def test_cli_reports_and_fails_on_a_missing_image(synthetic_raw, tmp_path):
  raw = _copy(synthetic_raw, tmp_path)
  ref, coco = _first_ref(raw)
  os.remove(os.path.join(raw, 'images', coco.imgs[ref['image_id']]['file_name']))
  out = subprocess.run(
      [sys.executable, '-m', 'data_prep.build', '--dataset=synthetic', f'--refer_root={raw}',
       f'--images={raw}/images', f'--data_dir={tmp_path}/records'],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
  assert out.returncode == 1
  assert 'missing image' in out.stderr and '--allow_missing' in out.stderr


def test_corrupt_jpeg_is_unreadable(synthetic_raw, tmp_path):
  raw = _copy(synthetic_raw, tmp_path)
  ref, coco = _first_ref(raw)
  path = os.path.join(raw, 'images', coco.imgs[ref['image_id']]['file_name'])
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 3])                # a truncated JPEG
  with pytest.raises(ValueError, match='unreadable image') as e:
    _build(raw, tmp_path / 'records')
  assert path in str(e.value)


def test_empty_segmentation(synthetic_raw, tmp_path):
  raw = _copy(synthetic_raw, tmp_path)
  ref, _ = _first_ref(raw)
  path = os.path.join(raw, 'synthetic', 'instances.json')
  with open(path) as f:
    instances = json.load(f)
  next(a for a in instances['annotations'] if a['id'] == ref['ann_id'])['segmentation'] = []
  with open(path, 'w') as f:
    json.dump(instances, f)
  with pytest.raises(ValueError, match='empty mask') as e:
    _build(raw, tmp_path / 'records')
  assert f'ref_id={ref["ref_id"]}' in str(e.value)
  assert f'annotation {ref["ann_id"]}: empty segmentation' in str(e.value)


def test_refs_file_without_split(synthetic_raw, tmp_path):
  raw = _copy(synthetic_raw, tmp_path)
  _edit_refs(raw, lambda refs: [r.pop('split') for r in refs])
  with pytest.raises(ValueError, match=r"refs\(unc\).p: ref #0 .* has no field\(s\) \['split'\]"):
    _build(raw, tmp_path / 'records')


def test_empty_expression(synthetic_raw, tmp_path):
  raw = _copy(synthetic_raw, tmp_path)
  ref, _ = _first_ref(raw)

  def blank(refs):
    target = next(r for r in refs if r['ref_id'] == ref['ref_id'])
    target['sentences'][0].update(raw='  ', sent='')
  _edit_refs(raw, blank)
  with pytest.raises(ValueError, match=rf'ref_id={ref["ref_id"]} sentence 0 .*empty expression'):
    _build(raw, tmp_path / 'records')


def test_long_expression_is_stored_as_is_and_truncated_by_the_pipeline(synthetic_raw, tmp_path):
  raw = _copy(synthetic_raw, tmp_path)
  long_text = ' '.join(['red'] * 100 + ['small', 'circle'] * 50)     # 200 words
  val_ref = {}

  def lengthen(refs):
    target = next(r for r in refs if r['split'] == 'val')
    target['sentences'][0].update(raw=long_text, sent=long_text, tokens=long_text.split())
    val_ref['ref_id'] = target['ref_id']
  _edit_refs(raw, lengthen)
  _build(raw, tmp_path / 'records')
  builder = refer_tfds.EavlRefer(config='synthetic', data_dir=str(tmp_path / 'records'))
  source = builder.as_data_source('val')
  stored = next(source[i] for i in range(len(source)) if source[i]['ref_id'] == val_ref['ref_id'])
  assert stored['sentences'][0].decode() == long_text

  config = tiny.get_config()
  config.data.data_dir = str(tmp_path / 'records')
  loader = input_pipeline.make_eval_loader(config, 'val', shard_index=0, shard_count=1,
                                           batch_size=4)
  rows = [(b['input_ids'][i], b['attention_mask'][i]) for b in loader for i in range(4)
          if b['ref_id'][i] == val_ref['ref_id'] and b['sentence_index'][i] == 0]
  assert len(rows) == 1
  ids, attention = rows[0]
  assert ids.shape == (config.model.max_tokens,) and attention.all()
  from eavl_jax import hub  # pylint: disable=g-import-not-at-top
  tokenizer = hub.load_tokenizer(config.model.text_encoder)
  assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
  assert tokenizer.decode(ids[1:-1]) == ' '.join(['red'] * (config.model.max_tokens - 2))


# ------------------------------------------------------------------ COCO train2014 / train2017


def _coco_named_layout(synthetic_raw, root, form):
  """The synthetic refer layout with instances.json naming image i COCO_train2014_<i, 12
  digits>.jpg, as the refer files name COCO's images, and an image folder holding them under
  `form`'s names: 'train2014' (those names), 'train2017' (<12 digits>.jpg) or 'neither'."""
  raw = os.path.join(root, 'raw')
  shutil.copytree(synthetic_raw, raw, ignore=shutil.ignore_patterns('images'))
  folder = os.path.join(root, form)
  os.makedirs(folder)
  path = os.path.join(raw, 'synthetic', 'instances.json')
  with open(path) as f:
    instances = json.load(f)
  for image in instances['images']:
    digits = f'{image["id"]:012d}'
    stored = {'train2014': f'COCO_train2014_{digits}.jpg', 'train2017': f'{digits}.jpg',
              'neither': f'img_{digits}.jpg'}[form]
    shutil.copy(os.path.join(synthetic_raw, 'images', image['file_name']),
                os.path.join(folder, stored))
    image['file_name'] = f'COCO_train2014_{digits}.jpg'
  with open(path, 'w') as f:
    json.dump(instances, f)
  return raw, folder


def test_train2017_names_resolve_to_the_same_images_as_train2014(synthetic_raw, tmp_path):
  records = {}
  for form in ('train2014', 'train2017'):
    raw, folder = _coco_named_layout(synthetic_raw, str(tmp_path / form), form)
    lines = []
    build.build('synthetic', raw, folder, str(tmp_path / form / 'records'), log=lines.append)
    assert f'images: COCO {form} names' in lines[0] and f'in {folder}' in lines[0], lines[0]
    source = refer_tfds.EavlRefer(config='synthetic', data_dir=str(tmp_path / form / 'records')
                                  ).as_data_source('train')
    records[form] = [(int(ex['image_id']), ex['image']) for ex in source]
  assert records['train2017'] == records['train2014'] and records['train2014']
  _, coco = _source(synthetic_raw)             # the original files, byte for byte
  for image_id, data in records['train2017']:
    with open(os.path.join(synthetic_raw, 'images', coco.imgs[image_id]['file_name']), 'rb') as f:
      assert data == f.read()


def test_image_folder_with_neither_coco_form_is_one_error(synthetic_raw, tmp_path):
  raw, folder = _coco_named_layout(synthetic_raw, str(tmp_path), 'neither')
  out = subprocess.run(
      [sys.executable, '-m', 'data_prep.build', '--dataset=synthetic', f'--refer_root={raw}',
       f'--images={folder}', f'--data_dir={tmp_path}/records'],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
  errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert out.returncode == 1 and len(errors) == 1 and 'Traceback' not in out.stderr, out.stderr
  assert folder in errors[0]
  assert 'COCO_train2014_<12 digits>.jpg' in errors[0] and '(<12 digits>.jpg)' in errors[0]
  with pytest.raises(FileNotFoundError, match='no_such_folder'):
    build.build('synthetic', raw, str(tmp_path / 'no_such_folder'), str(tmp_path / 'r'),
                log=_quiet)


def lavt_get_mask(ann, image):
  """refer's getMask as LAVT's ReferDataset uses it, transcribed: the polygons decoded and summed
  over the last axis, then annot[ref_mask == 1] = 1."""
  from pycocotools import mask as mask_utils  # pylint: disable=g-import-not-at-top
  rle = mask_utils.frPyObjects(ann['segmentation'], image['height'], image['width'])
  m = mask_utils.decode(rle)
  m = np.sum(m, axis=2).astype(np.uint8)
  annot = np.zeros(m.shape)
  annot[m == 1] = 1
  return annot.astype(np.uint8)


def test_mask_rule_lavt_stores_lavts_masks(synthetic_raw, tmp_path):
  """--mask_rule=lavt: where two polygons of an annotation overlap, LAVT's mask is background
  (its `ref_mask == 1`); the default union keeps the pixels. The rule is in the metadata."""
  from eavl_jax.data import refer  # pylint: disable=g-import-not-at-top
  raw = _copy(synthetic_raw, tmp_path)
  refs, coco = _source(raw)
  path = os.path.join(raw, 'synthetic', 'instances.json')
  with open(path) as f:
    instances = json.load(f)
  polygons = {a['id'] for a in instances['annotations'] if isinstance(a['segmentation'], list)}
  ref = next(r for r in refs if r['split'] == 'val' and r['ann_id'] in polygons)
  ann = next(a for a in instances['annotations'] if a['id'] == ref['ann_id'])
  x, y, w, h = ann['bbox']
  ann['segmentation'] = [ann['segmentation'][0],        # a second polygon over half the box
                         [x, y, x + w / 2, y, x + w / 2, y + h, x, y + h]]
  with open(path, 'w') as f:
    json.dump(instances, f)
  image = coco.imgs[ref['image_id']]
  want = lavt_get_mask(ann, image)
  union = refer.annotation_mask(ann, image['height'], image['width'])
  np.testing.assert_array_equal(refer.annotation_mask(ann, image['height'], image['width'],
                                                      'lavt'), want)
  assert (union > want).sum() > 0 and not (want > union).any()   # the overlap only
  _build(raw, tmp_path / 'lavt', mask_rule='lavt')
  builder = refer_tfds.EavlRefer(config='synthetic', data_dir=str(tmp_path / 'lavt'))
  assert builder.info.metadata['mask_rule'] == 'lavt'
  source = builder.as_data_source('val')
  ex = next(source[i] for i in range(len(source)) if int(source[i]['ref_id']) == ref['ref_id'])
  np.testing.assert_array_equal(input_pipeline.decode_mask(ex['mask']), want)
  with pytest.raises(ValueError, match='mask_rule'):
    _build(raw, tmp_path / 'bad', mask_rule='cris')


def test_a_data_dir_that_holds_the_data_set_is_refused_unless_overwrite(synthetic_raw, tmp_path):
  """The issue's case: new refer files built into a data_dir that already holds the data set.
  Refused in one line, the records untouched; --overwrite rebuilds, and the printed counts are
  those of the new records on disk."""
  raw = _copy(synthetic_raw, tmp_path)
  data_dir = tmp_path / 'records'
  first = _build(raw, data_dir)
  _edit_refs(raw, lambda refs: refs.remove(next(r for r in refs if r['split'] == 'val')))
  command = [sys.executable, '-m', 'data_prep.build', '--dataset=synthetic', f'--refer_root={raw}',
             f'--images={raw}/images', f'--data_dir={data_dir}']
  cwd = os.path.dirname(os.path.dirname(__file__))
  out = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)
  errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert out.returncode == 1 and len(errors) == 1 and 'Traceback' not in out.stderr, out.stderr
  assert 'already holds the records of synthetic' in errors[0] and '--overwrite' in errors[0]
  assert build.counts_on_disk('synthetic', str(data_dir))['val'] == first['val']

  out = subprocess.run(command + ['--overwrite'], capture_output=True, text=True, cwd=cwd,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  on_disk = build.counts_on_disk('synthetic', str(data_dir))
  assert on_disk['val']['refs'] == first['val']['refs'] - 1
  printed = [line.split() for line in (out.stdout + out.stderr).splitlines()
             if line.startswith('val ')]
  assert printed == [['val', str(on_disk['val']['refs']), str(on_disk['val']['sentences'])]]


def test_an_empty_refs_list_or_instances_file_is_one_line_naming_the_file(synthetic_raw, tmp_path):
  empty_refs = _copy(synthetic_raw, tmp_path / 'a')
  _edit_refs(empty_refs, lambda refs: refs.clear())
  empty_instances = _copy(synthetic_raw, tmp_path / 'b')
  open(os.path.join(empty_instances, 'synthetic', 'instances.json'), 'w').close()
  cases = {empty_refs: os.path.join(empty_refs, 'synthetic', 'refs(unc).p') +
                       ': the list of refs is empty',
           empty_instances: os.path.join(empty_instances, 'synthetic', 'instances.json') +
                            ': not readable JSON'}
  procs = {raw: subprocess.Popen(
      [sys.executable, '-m', 'data_prep.build', '--dataset=synthetic', f'--refer_root={raw}',
       f'--images={raw}/images', f'--data_dir={tmp_path}/records'], text=True,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(__file__)))
           for raw in cases}
  for raw, proc in procs.items():
    _, err = proc.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert proc.returncode == 1 and len(errors) == 1 and 'Traceback' not in err, err[-2000:]
    assert errors[0].startswith('error: ' + cases[raw]), errors[0]
