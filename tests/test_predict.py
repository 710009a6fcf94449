"""`python -m eavl_jax.predict`: the mask PNG at the image's size, N_q query panels, errors."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import torch

from eavl_jax import scoring
from eavl_jax import predict

IMAGE_HW = (45, 70)  # (H, W): not square, not the model's size
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_cli(*args):
  """Starts `python -m eavl_jax.predict --config=configs/tiny.py args`; `finish` waits for it. The
  tests start their command lines first and do their in-process work meanwhile."""
  return subprocess.Popen([sys.executable, '-m', 'eavl_jax.predict', '--config=configs/tiny.py',
                           *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def finish(proc):
  stdout, stderr = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope='module')
def image_path(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = str(tmp_path_factory.mktemp('predict_image') / 'scene.jpg')
  Image.fromarray(rng.integers(0, 255, IMAGE_HW + (3,), dtype=np.uint8)).save(path)
  return path


def test_writes_mask_png_of_image_size_and_query_grid(tiny_trained, image_path, tmp_path):
  config = tiny_trained.config()
  # The command line (checkpoint given as a step folder) must write the same two images.
  cli_out = str(tmp_path / 'cli.png')
  step_dir = os.path.join(tiny_trained.workdir, 'checkpoints', str(tiny_trained.steps))
  # Longer than model.max_tokens: cut as in training, and said so.
  text = 'the red circle' + ' left of the small blue square' * 4
  cli = start_cli(f'--workdir={tmp_path}', f'--checkpoint={step_dir}', f'--image={image_path}',
                  f'--text={text}', f'--out={cli_out}', '--per_query')

  out = str(tmp_path / 'out.png')
  result, written = predict.run(config, tiny_trained.workdir, image_path, text, out,
                                per_query=True)
  assert result['step'] == tiny_trained.steps
  words = len(text.split())   # one token each here, plus [CLS] and [SEP]
  assert result['tokens_dropped'] == words + 2 - config.model.max_tokens > 0
  assert written == [out, str(tmp_path / 'out_queries.png')]
  with Image.open(out) as im:
    assert im.format == 'PNG' and im.size == IMAGE_HW[::-1]
  assert result['mask'].shape == IMAGE_HW
  # The written overlay is red exactly where the mask is, the image elsewhere.
  drawn = np.asarray(Image.open(out).convert('RGB')).astype(int)
  expected = scoring.overlay(result['rgb'], result['mask']).astype(int)
  np.testing.assert_array_equal(drawn, expected)

  # (The briefly trained model predicts background everywhere; the blend itself, on a half mask:)
  half = np.zeros(IMAGE_HW, bool)
  half[:, :IMAGE_HW[1] // 2] = True
  blended = scoring.overlay(result['rgb'], half).astype(int)
  alpha = scoring.OVERLAY_ALPHA
  red = (result['rgb'] * (1 - alpha) + np.array([255, 0, 0]) * alpha).round()
  np.testing.assert_array_equal(blended[half], red[half])
  np.testing.assert_array_equal(blended[~half], result['rgb'][~half])

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

  # --per_query: N_q panels of one size, in query order on a near-square grid.
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
  for k, panel in enumerate(panels):
    r, c = divmod(k, cols)
    np.testing.assert_array_equal(
        grid[r * (ph + 4):r * (ph + 4) + ph, c * (pw + 4):c * (pw + 4) + pw], panel)

  proc = finish(cli)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'checkpoint step {tiny_trained.steps}' in proc.stdout
  assert 'estimator scores (best first)' in proc.stdout
  assert (f'note: the expression is longer than model.max_tokens={config.model.max_tokens} '
          f'tokens: its last {result["tokens_dropped"]} token(s) were cut') in proc.stdout
  for ours, theirs in ((out, cli_out), (written[1], str(tmp_path / 'cli_queries.png'))):
    np.testing.assert_array_equal(np.asarray(Image.open(theirs)), np.asarray(Image.open(ours)))


def test_query_panels_colour_the_mask_over_grey():
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, IMAGE_HW + (3,), dtype=np.uint8)
  query_logits = np.full((2, 8, 8), -30.0, np.float32)
  query_logits[0, :, :4] = 30.0   # query 0: the left half; query 1: nothing
  panels = predict.query_panels(rgb, query_logits, np.array([0.9, 0.1], np.float32))
  ph = panels[0].shape[0] - predict.CAPTION_HEIGHT
  image = panels[0][:ph].astype(int)                                 # (ph, pw, 3)
  pw = image.shape[1]
  inside, outside = image[:, :pw // 2 - 20], image[:, pw // 2 + 20:]
  colour = predict.QUERY_RGB[0]                                      # magenta: R, B over G
  assert colour.tolist() == [255, 0, 255]
  assert (inside[..., 0] - inside[..., 1] > 100).all() and (inside[..., 0] == inside[..., 2]).all()
  for grey in (outside, panels[1][:ph].astype(int)):               # R = G = B, dimmed
    assert (grey == grey[..., :1]).all()
    lo, hi = predict.GREY_RANGE
    assert lo <= grey.min() and grey.max() <= hi
  # The outline of sigmoid > 0.5: one white pixel per row, where the mask ends; not the border.
  white = (image == 255).all(-1)
  rows, cols = np.nonzero(white)
  np.testing.assert_array_equal(rows, np.arange(ph))
  assert len(set(cols)) == 1 and abs(cols[0] - pw // 2) <= 1



def test_validation_panels_red_prediction_left_green_truth_right():
  """scoring.prediction_panels (TensorBoard's val/predictions) with the same overlay."""
  s = 8
  image = np.zeros((1, s, s, 3), np.float32)                          # normalised: the mean RGB
  rgb = scoring.denormalize(image[0]).astype(float)
  logits = np.full((1, s // 4, s // 4), -1.0, np.float32)
  logits[0, 0, 1] = 1.0                                               # top right quarter
  mask_orig = np.zeros((1, 20, 20), np.uint8)
  mask_orig[0, :6, :3] = 1                                            # a (12, 6) image's top left
  truth = scoring.truth_at_input_size({'mask_orig': mask_orig, 'orig_size': [[12, 6]]}, s)
  expected = np.zeros((s, s), bool)
  expected[:4, :4] = True    # pixel i samples row i * 12 // 8 < 6 and column i * 6 // 8 < 3: i < 4
  np.testing.assert_array_equal(truth[0] > 0, expected)
  np.testing.assert_array_equal(scoring.truth_at_input_size({'mask': truth}, s), truth)
  [panel] = scoring.prediction_panels(image, logits, truth)
  assert panel.shape == (s, 2 * s, 3) and panel.dtype == np.uint8
  pred = np.zeros((s, s), bool)
  pred[:4, 4:] = True
  for half, where, colour in ((panel[:, :s], pred, [255, 0, 0]), (panel[:, s:], expected,
                                                                   [0, 255, 0])):
    blended = (0.5 * rgb + 0.5 * np.array(colour)).round()
    np.testing.assert_array_equal(half[where], blended[where])
    np.testing.assert_array_equal(half[~where], rgb[~where])
def test_clear_errors(tiny_trained, image_path, tmp_path, monkeypatch):
  config, workdir = tiny_trained.config(), tiny_trained.workdir
  not_image = tmp_path / 'notes.jpg'
  not_image.write_text('not an image')
  out = str(tmp_path / 'out.png')
  # The command line: one line naming the thing, no traceback (checked below).
  cases = [((f'--image={not_image}', '--text=the cat'),
            f"error: cannot read the image '{not_image}'"),
           ((f'--image={image_path}', '--text='), "error: the expression --text='' is empty")]
  clis = [start_cli(f'--workdir={workdir}', *args, f'--out={out}') for args, _ in cases]

  with pytest.raises(ValueError, match='cannot read the image .*notes.jpg'):
    predict.run(config, workdir, str(not_image), 'the cat', out)
  with pytest.raises(ValueError, match='cannot read the image .*missing.png'):
    predict.run(config, workdir, str(tmp_path / 'missing.png'), 'the cat', out)
  with pytest.raises(ValueError, match='expression .* is empty'):
    predict.run(config, workdir, image_path, '   ', out)
  with monkeypatch.context() as m:   # more pixels than PIL decodes (a 14000² PNG, scaled down)
    m.setattr(Image, 'MAX_IMAGE_PIXELS', IMAGE_HW[0] * IMAGE_HW[1] // 3)
    with pytest.raises(ValueError, match='cannot read the image .*decompression bomb'):
      predict.run(config, workdir, image_path, 'the cat', out)
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    predict.run(config, str(tmp_path), image_path, 'the cat', out)
  with pytest.raises(ValueError, match='folder .* does not exist'):
    predict.run(config, workdir, image_path, 'the cat', str(tmp_path / 'nowhere' / 'out.png'))
  other = tiny_trained.config()
  other.model.hidden_dim = 48
  with pytest.raises(ValueError, match='another config'):
    predict.run(other, workdir, image_path, 'the cat', out)
  assert not os.path.exists(out)

  for cli, (_, start) in zip(clis, cases):
    proc = finish(cli)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    [line] = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
    assert line.startswith(start), line
  assert not os.path.exists(out)
