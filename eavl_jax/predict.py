"""The referred object's mask over one image, from a trained checkpoint.

  python -m eavl_jax.predict --config=configs/refcoco.py --workdir=DIR --image=IMG \
      --text="the man on the left" --out=OUT.png [--per_query] [--checkpoint=STEP_OR_PATH | --best]

OUT.png: the image at its own size with the predicted mask (logits upsampled bilinearly to the
original size, logit > 0; as in evaluation) in red. --per_query also writes OUT_queries.png: a grid
of the N_q per-query masks mask_n (eq. 12) with their estimator scores S_qn (eq. 13), as in the
paper's fig. 4: each panel shows the image in dimmed grey, sigmoid(mask_n) blended in a saturated
colour of QUERY_RGB (one per query, cycling) and the outline of sigmoid > 0.5 in white, so any
mask stands out on any image.
"""
import io
import math
import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw

from eavl_jax import cli
from eavl_jax import checkpointing
from eavl_jax import config_check
from eavl_jax import errors
from eavl_jax import scoring
from eavl_jax import input_pipeline
from eavl_jax import losses
from eavl_jax import weights
from eavl_jax.models import builder

FLAGS = flags.FLAGS
PANEL_SIZE = 192     # long side of a per-query panel, pixels
CAPTION_HEIGHT = 14  # caption strip under each panel
# Query panels: query n in colour n (cycling): magenta, cyan, yellow, green, orange, azure.
QUERY_RGB = np.array([[255, 0, 255], [0, 255, 255], [255, 255, 0], [0, 255, 0], [255, 128, 0],
                      [0, 128, 255]], np.float32)
QUERY_ALPHA = 0.6
GREY_RANGE = (32, 160)   # the panels' grey image: luminance 0..255 mapped onto this range
OUTLINE_RGB = np.array([255, 255, 255], np.float32)


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  cli.define_config_flag()
  cli.define_checkpoint_flags('Training workdir holding checkpoints/.')
  flags.DEFINE_string('image', None, 'Input image (any format PIL reads).')
  flags.DEFINE_string('text', None, 'The referring expression.')
  flags.DEFINE_string('out', None, 'Output PNG: the mask over the image.')
  flags.DEFINE_bool('per_query', False, 'Also write <out>_queries.png: the N_q masks and scores.')


def load_image(path, size):
  """-> (model input (1, S, S, 3) normalised as in training, original RGB (H, W, 3) uint8)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as im:
      rgb = np.asarray(im.convert('RGB'))
    image = input_pipeline.decode_image(data, size)
  except (OSError, Image.DecompressionBombError) as e:
    # missing file, not an image, truncated data (PIL's OSError kinds); or more pixels than PIL
    # decodes (Image.MAX_IMAGE_PIXELS), which a resize of the file first avoids
    raise ValueError(f'cannot read the image {path!r}: {e}') from None
  return image[None], rgb


def tokenize(config, text):
  """-> input_ids, attention_mask (1, L) int32, truncated to model.max_tokens like training; and
  how many tokens that cut dropped."""
  if text is None or not text.strip():
    raise ValueError(f'the expression --text={text!r} is empty')
  tokenizer = input_pipeline.Tokenize(config.model.text_encoder, config.model.max_tokens)
  input_ids, attention_mask = tokenizer(text)
  return input_ids[None], attention_mask[None], tokenizer.dropped(text)


def predict(config, variables, image_path, text):
  """-> dict: 'rgb' (H, W, 3) uint8, 'logits' (H, W) float32 at the original size, 'mask' (H, W)
  bool, 'query_logits' (N_q, h, w) at 1/4 of the input, 'scores' (N_q,), 'tokens_dropped': how
  many tokens of `text` the cut to model.max_tokens left out."""
  image, rgb = load_image(image_path, config.model.image_size)
  input_ids, attention_mask, dropped = tokenize(config, text)
  model = builder.build_model(weights.with_checkpoint_text_sizes(config.model))
  out = jax.jit(lambda v, *x: model.apply(v, *x, train=False))(
      variables, image, input_ids, attention_mask)
  h, w = rgb.shape[:2]
  logits = np.asarray(losses.upsample_logits(out['logits'][0], h, w))   # (H, W)
  return {'rgb': rgb, 'logits': logits, 'mask': logits > 0,
          'query_logits': np.asarray(out['masks'][0]), 'scores': np.asarray(out['scores'][0]),
          'tokens_dropped': dropped}


def dimmed_grey(rgb):
  """(H, W, 3) uint8 -> (H, W, 3) float32 with R = G = B: the luminance (ITU-R BT.601) mapped
  linearly onto GREY_RANGE, so that saturated colours and white stand out on it."""
  y = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)      # (H, W)
  lo, hi = GREY_RANGE
  return np.repeat((lo + y * ((hi - lo) / 255))[..., None], 3, axis=-1)


def outline(mask):
  """(H, W) bool -> (H, W) bool: the mask's pixels with a 4-neighbour outside it (1 pixel thick;
  the image border is not an edge)."""
  p = np.pad(mask, 1, mode='edge')
  inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
  return mask & ~inner


def query_overlay(rgb, prob, colour):
  """rgb (H, W, 3) uint8, prob (H, W) in [0, 1], colour (3,) -> (H, W, 3) uint8: the image in
  dimmed grey, `colour` blended in by QUERY_ALPHA * prob, the outline of prob > 0.5 in white."""
  out = scoring.overlay(dimmed_grey(rgb), prob, colour, QUERY_ALPHA)
  out[outline(prob > 0.5)] = OUTLINE_RGB
  return out


def query_panels(rgb, query_logits, scores):
  """One panel per query: the image (long side PANEL_SIZE) with sigmoid(mask_n) over it
  (query_overlay in QUERY_RGB's colour n, cycling) and a caption 'q<n>  S=<score>'.
  -> list of N_q (ph + CAPTION_HEIGHT, pw, 3) uint8 arrays."""
  h, w = rgb.shape[:2]
  scale = PANEL_SIZE / max(h, w)
  ph, pw = max(1, round(h * scale)), max(1, round(w * scale))
  small = np.asarray(Image.fromarray(rgb).resize((pw, ph), Image.BILINEAR))
  probs = np.asarray(jax.nn.sigmoid(losses.upsample_logits(query_logits, ph, pw)))  # (N_q, ph, pw)
  panels = []
  for n, (p, s) in enumerate(zip(probs, scores)):
    canvas = Image.new('RGB', (pw, ph + CAPTION_HEIGHT), 'white')
    canvas.paste(Image.fromarray(query_overlay(small, p, QUERY_RGB[n % len(QUERY_RGB)])), (0, 0))
    ImageDraw.Draw(canvas).text((2, ph + 1), f'q{n}  S={s:.3f}', fill='black')
    panels.append(np.asarray(canvas))
  return panels


def grid(panels, gap=4):
  """Panels of one size -> a near-square grid (white gaps), row-major in query order."""
  ph, pw, _ = panels[0].shape
  cols = math.ceil(math.sqrt(len(panels)))
  rows = math.ceil(len(panels) / cols)
  out = np.full((rows * ph + (rows - 1) * gap, cols * pw + (cols - 1) * gap, 3), 255, np.uint8)
  for k, panel in enumerate(panels):
    r, c = divmod(k, cols)
    out[r * (ph + gap):r * (ph + gap) + ph, c * (pw + gap):c * (pw + gap) + pw] = panel
  return out


def queries_path(out_path):
  stem, _ = os.path.splitext(out_path)
  return stem + '_queries.png'


def check_out_path(out_path):
  folder = os.path.dirname(os.path.abspath(out_path))
  if not os.path.isdir(folder):
    raise ValueError(f'--out={out_path!r}: the folder {folder} does not exist')


def write_outputs(result, out_path, per_query=False):
  """Writes OUT.png (and OUT_queries.png) -> the paths written."""
  check_out_path(out_path)
  Image.fromarray(scoring.overlay(result['rgb'], result['mask'])).save(out_path, format='PNG')
  written = [out_path]
  if per_query:
    panels = query_panels(result['rgb'], result['query_logits'], result['scores'])
    Image.fromarray(grid(panels)).save(queries_path(out_path), format='PNG')
    written.append(queries_path(out_path))
  return written


def run(config, workdir, image_path, text, out_path, *, per_query=False, checkpoint=None,
        best=False):
  """Checks the inputs, restores the checkpoint, predicts, writes -> (result, paths written)."""
  config_check.validate(config)
  load_image(image_path, config.model.image_size)  # bad inputs fail before the restore
  tokenize(config, text)
  check_out_path(out_path)
  variables, step = checkpointing.restore_variables(config, workdir, checkpoint, best)
  result = predict(config, variables, image_path, text)
  result['step'] = step
  return result, write_outputs(result, out_path, per_query)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.drop_closed_loop_noise()   # a damaged checkpoint: one error line
  for name in ('config', 'workdir', 'image', 'text', 'out'):
    if FLAGS[name].value is None:
      raise app.UsageError(f'--{name} is required')
  try:
    result, written = run(FLAGS.config, FLAGS.workdir, FLAGS.image, FLAGS.text, FLAGS.out,
                          per_query=FLAGS.per_query, checkpoint=FLAGS.checkpoint,
                          best=FLAGS.best)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(errors.error_message(e))
  if result['tokens_dropped']:
    print(f'note: the expression is longer than model.max_tokens={FLAGS.config.model.max_tokens} '
          f'tokens: its last {result["tokens_dropped"]} token(s) were cut, as in training')
  print(f'checkpoint step {result["step"]}: foreground {result["mask"].mean():.1%} of the image')
  if FLAGS.per_query:
    order = np.argsort(-result['scores'])
    print('estimator scores (best first): '
          + ', '.join(f'q{n}={result["scores"][n]:.3f}' for n in order))
  print('written: ' + ', '.join(written))


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
