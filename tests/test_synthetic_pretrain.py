"""The vision encoder pretrained on the synthetic train images (pretrain.vision_steps)."""
import json
import os
import pickle

import jax
import numpy as np
import pytest

from configs import tiny
from eavl_jax import synthetic_pretrain
from eavl_jax import config_check
from eavl_jax import synthetic_task
from eavl_jax.weights import report
from eavl_jax.weights import swin as swin_weights


def test_attribute_maps_hold_each_shapes_kind_colour_and_size(synthetic_raw):
  images, labels, names = synthetic_pretrain.attribute_maps(synthetic_raw, 128)
  assert images.shape == (len(labels), 128, 128, 3) and labels.shape[1:] == (128, 128, 3)
  with open(os.path.join(synthetic_raw, 'synthetic', 'instances.json')) as f:
    anns = json.load(f)['annotations']
  all_ids = sorted({a['image_id'] for a in anns})
  checked = 0
  # The label at each train shape's centre is that shape's attributes.
  image_ids = _train_image_ids(synthetic_raw)
  for a in anns:
    if a['image_id'] not in image_ids:
      continue
    x, y = (int(round(v)) for v in a['center'])
    got = labels[image_ids.index(a['image_id']), y, x]
    assert tuple(got) == (a['category_id'], names['colour'].index(a['colour']) + 1,
                          names['size'].index(a['size']) + 1)
    checked += 1
  assert checked > 0 and len(image_ids) < len(all_ids)    # val / test images are left out
  assert (labels == 0).mean() > 0.5                           # background everywhere else


def _train_image_ids(raw):
  with open(os.path.join(raw, 'synthetic', 'refs(unc).p'), 'rb') as f:
    return sorted({r['image_id'] for r in pickle.load(f) if r['split'] == 'train'})


def test_cell_labels_take_each_cells_centre():
  labels = np.arange(16 * 16 * 3).reshape(1, 16, 16, 3)
  cells = synthetic_pretrain.cell_labels(labels, 4)
  assert cells.shape == (1, 4, 4, 3)
  np.testing.assert_array_equal(cells[0, 1, 2], labels[0, 6, 10])


def test_pretraining_writes_a_swin_the_model_loads_and_training_uses_it(tmp_path):
  config = tiny.get_config()
  config.data.synthetic_images = 30
  config.pretrain.vision_steps = 3
  config.pretrain.batch_size = 4
  config.pretrain.warmup_steps = 1
  prepared = synthetic_task.prepare(config, str(tmp_path))
  folder = prepared.model.vision_encoder.pretrained
  assert folder == str(tmp_path / 'data' / 'pretrained_vision')
  # Every Swin parameter is in the file (no missing or unexpected key), plus its final norm.
  flat, final_norm, _, _ = swin_weights.read_swin(folder)
  expected = report.flatten(swin_weights.abstract_params(config.model.vision_encoder))
  assert sorted(flat) == sorted(expected) and sorted(final_norm) == ['bias', 'scale']
  # Made once: a second call reuses it; another pretraining config is refused.
  mtime = os.path.getmtime(os.path.join(folder, swin_weights.CONVERTED_FILE))
  synthetic_task.prepare(config, str(tmp_path))
  assert os.path.getmtime(os.path.join(folder, swin_weights.CONVERTED_FILE)) == mtime
  config.pretrain.vision_steps = 4
  with pytest.raises(ValueError, match='pretrained_vision holds a vision encoder'):
    synthetic_task.prepare(config, str(tmp_path))
  # The train state starts from it.
  from eavl_jax import optim  # pylint: disable=g-import-not-at-top
  from eavl_jax import sharding  # pylint: disable=g-import-not-at-top
  from eavl_jax import train_state  # pylint: disable=g-import-not-at-top
  from eavl_jax.models import builder  # pylint: disable=g-import-not-at-top
  tx, _ = optim.make_optimizer(prepared.optim, 10)
  state, _ = train_state.create_train_state(prepared, builder.build_model(prepared.model), tx,
                                            sharding.make_mesh(prepared.mesh))
  got = report.flatten(jax.device_get(state.params['vision_encoder']))
  np.testing.assert_array_equal(got['patch_embed/proj/kernel'], flat['patch_embed/proj/kernel'])


def test_pretraining_needs_the_generated_synthetic_data(synthetic_records):
  config = tiny.get_config()
  config.pretrain.vision_steps = 3
  config.data.data_dir = synthetic_records
  with pytest.raises(ValueError, match=r"pretrain.vision_steps=3: .* data.data_dir=''"):
    config_check.validate(config)   # before anything is generated
