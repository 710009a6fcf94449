"""`python -m eavl_jax.predict`: the mask PNG at the image's size, N_q query panels, clear errors."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import torch

from configs import tiny
from eavl_jax import checkpointing
from eavl_jax import model_info
from eavl_jax import optim
from eavl_jax import predict
from eavl_jax import train_state

IMAGE_HW = (45, 70)  # (H, W): not square, not the model's size


class _NoDataIterator:
  def get_state(self):
    return b'{}'


@pytest.fixture(scope='module')
def config():
  return tiny.get_config()


@pytest.fixture(scope='module')
def init_workdir(config, tmp_path_factory):
  """A checkpoint of random parameters (N(0, 0.02), made without compiling model.init), written
  with the training's checkpoint API."""
  workdir = str(tmp_path_factory.mktemp('predict_init_run'))
  params = model_info.random_params(config.model)
  tx, _ = optim.make_optimizer(config.optim, 10)
  state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  manager = checkpointing.make_manager(workdir, config.train)
  checkpointing.save(manager, 0, state, _NoDataIterator())
  manager.wait_until_finished()
  manager.close()
  return workdir


@pytest.fixture(scope='module')
def image_path(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = str(tmp_path_factory.mktemp('predict_image') / 'scene.jpg')
  Image.fromarray(rng.integers(0, 255, IMAGE_HW + (3,), dtype=np.uint8)).save(path)
  return path


def test_writes_mask_png_of_image_size_and_query_grid(config, init_workdir, image_path, tmp_path):
  out = str(tmp_path / 'out.png')
  result, written = predict.run(config, init_workdir, image_path, 'the red circle', out,
                                per_query=True)
  assert written == [out, str(tmp_path / 'out_queries.png')]
  with Image.open(out) as im:
    assert im.format == 'PNG' and im.size == IMAGE_HW[::-1]
  assert result['mask'].shape == IMAGE_HW
  # The written overlay is red exactly where the mask is, the image elsewhere.
  drawn = np.asarray(Image.open(out).convert('RGB')).astype(int)
  expected = predict.overlay(result['rgb'], result['mask']).astype(int)
  np.testing.assert_array_equal(drawn, expected)

  n_q = config.model.num_queries
  scores = result['scores']
  assert scores.shape == (n_q,) and np.isclose(scores.sum(), 1.0, atol=1e-5)
  # The mask: eq. 14's sum of the query masks, resized bilinearly (torch, half-pixel), logit > 0.
  low = np.einsum('n,nhw->hw', scores.astype(np.float64), result['query_logits'])
  ref = torch.nn.functional.interpolate(torch.from_numpy(low)[None, None], size=IMAGE_HW,
                                        mode='bilinear', align_corners=False)[0, 0].numpy()
  np.testing.assert_allclose(result['logits'], ref, atol=1e-4)
  sure = np.abs(ref) > 1e-4
  np.testing.assert_array_equal(result['mask'][sure], ref[sure] > 0)
  panels = predict.query_panels(result['rgb'], result['query_logits'], scores)
  assert len(panels) == n_q
  assert len({p.shape for p in panels}) == 1
  ph, pw, _ = panels[0].shape
  assert max(ph - predict.CAPTION_HEIGHT, pw) == predict.PANEL_SIZE
  with Image.open(written[1]) as im:
    grid = np.asarray(im.convert('RGB'))
  cols = int(np.ceil(np.sqrt(n_q)))
  rows = int(np.ceil(n_q / cols))
  assert grid.shape == (rows * ph + (rows - 1) * 4, cols * pw + (cols - 1) * 4, 3)
  for k, panel in enumerate(panels):  # every panel sits at its place in query order
    r, c = divmod(k, cols)
    np.testing.assert_array_equal(grid[r * (ph + 4):r * (ph + 4) + ph, c * (pw + 4):c * (pw + 4) + pw],
                                  panel)


def test_clear_errors(config, init_workdir, image_path, tmp_path):
  not_image = tmp_path / 'notes.jpg'
  not_image.write_text('not an image')
  out = str(tmp_path / 'out.png')
  with pytest.raises(ValueError, match='cannot read the image'):
    predict.run(config, init_workdir, str(not_image), 'the cat', out)
  with pytest.raises(ValueError, match='cannot read the image'):
    predict.run(config, init_workdir, str(tmp_path / 'missing.png'), 'the cat', out)
  with pytest.raises(ValueError, match='empty'):
    predict.run(config, init_workdir, image_path, '   ', out)
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    predict.run(config, str(tmp_path), image_path, 'the cat', out)
  other = tiny.get_config()
  other.model.hidden_dim = 48
  with pytest.raises(ValueError, match='another config'):
    predict.run(other, init_workdir, image_path, 'the cat', out)
  assert not os.path.exists(out)

  proc = subprocess.run(
      [sys.executable, '-m', 'eavl_jax.predict', '--config=configs/tiny.py',
       f'--workdir={init_workdir}', f'--image={not_image}', '--text=the cat', f'--out={out}'],
      capture_output=True, text=True, timeout=300, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 1
  assert 'error: cannot read the image' in proc.stderr and 'Traceback' not in proc.stderr
