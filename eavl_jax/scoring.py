"""A model scored on one split (`evaluate_split`), the single path of the trainer's validation and of
`python -m eavl_jax.evaluate`; and the mask overlays of both and of `python -m eavl_jax.predict`.

The metric and what it is computed at follow `config.eval.protocol` (eavl_jax/metrics.py,
docs/evaluation.md).
"""
import jax
import numpy as np

from eavl_jax import input_pipeline
from eavl_jax import metrics
from eavl_jax import sharding

OVERLAY_ALPHA = 0.5
PREDICTION_RGB = np.array([255, 0, 0], np.float32)   # predictions in red
TRUTH_RGB = np.array([0, 255, 0], np.float32)        # ground truth in green


def local_batch_size(batch_size, mesh):
  """Global eval batch -> this process's rows; it must split over processes and devices."""
  devices, processes = mesh.devices.size, jax.process_count()
  if batch_size < 1 or batch_size % devices or batch_size % processes:
    raise ValueError(f'eval batch size {batch_size} must be a positive multiple of the '
                     f'{devices} device(s) and {processes} process(es)')
  return batch_size // processes


def describe_protocol(config):
  """-> e.g. "protocol 'lavt' (scored at the 480x480 input size)", for table headers."""
  protocol = config.eval.protocol
  metrics.check_protocol(protocol)
  s = config.model.image_size
  where = f'the {s}x{s} input size' if protocol == 'lavt' else metrics.PROTOCOLS[protocol]
  return f'protocol {protocol!r} (scored at {where})'


# eval.protocol -> how the model's S/4 logits reach the scored size, and the ground truth there.
UPSAMPLING = {'original': "bilinear, half-pixel centres (align_corners=False), to each image's "
                          "original (H, W)",
              'lavt': 'bilinear, corners aligned (align_corners=True, as LAVT\'s model), to the '
                      'S x S input'}
GROUND_TRUTH = {'original': "the record's mask at its original size",
                'lavt': "the record's mask resized to S x S by PIL's nearest neighbour"}


def scoring_record(config):
  """Everything that decides the digits of an evaluation under config.eval.protocol, for the
  eval JSON (two runs compare without reading code): the protocol, the sizes, how images, masks
  and sentences become the model's inputs, how the logits are upsampled and thresholded, the
  metrics' arithmetic, and what the records were built with (data_prep: resize_to, mask_rule)."""
  protocol = config.eval.protocol
  metrics.check_protocol(protocol)
  token_rule, image_rule = input_pipeline.eval_rules(config)
  t = config.model.text_encoder
  return {
      'protocol': protocol,
      'image_size': config.model.image_size,
      'image': input_pipeline.IMAGE_RULES[image_rule],
      'ground_truth': GROUND_TRUTH[protocol],
      'records': input_pipeline.records_metadata(config),
      'max_tokens': config.model.max_tokens,
      'token_rule': input_pipeline.TOKEN_RULES[token_rule],
      'tokenizer': t.tokenizer or t.pretrained,
      'logits_upsampling': UPSAMPLING[protocol],
      'foreground': 'logit > 0 (the argmax of (background, object); a tie is background)',
      'metrics': 'I, U per sentence; oIoU = sum I / sum U; mIoU = mean I/U (empty union: 0); '
                 'Pr@X = share of I/U >= X' + ("; 'lavt_test': test.py's numbers in its "
                                               "arithmetic" if protocol == 'lavt' else ''),
  }


def evaluate_split(config, predict_fn, split, *, mesh, batch_size=None, logits_on_canvas=False,
                   num_images=0):
  """Metrics of one split under config.eval.protocol: every sentence once, padding never counted.

  predict_fn(batch) -> logits (B, h, w) over the whole image (or (B, M, M) on the original-size
    canvas with logits_on_canvas=True), or the model's dict {'logits', 'masks', 'scores'} (then
    the result also holds metrics.DIVERSITY_KEYS); batch: global arrays sharded over the mesh
    (metrics.eval_keys). For the model: `lambda b: predict(variables, b)` with
    steps.make_predict_fn's predict.
  batch_size: global eval batch; default config.train.eval_batch_size.
  num_images: > 0 also draws the first batch's first `num_images` predictions (prediction_panels).
  Returns (metrics.summarize's dict (+ DIVERSITY_KEYS), (N, S, 2S, 3) uint8 panels or None).
  """
  protocol = config.eval.protocol
  local = local_batch_size(batch_size or config.train.eval_batch_size, mesh)
  pc = jax.process_count()
  num_examples = input_pipeline.num_eval_examples(config, split)
  num_batches = metrics.num_eval_batches(num_examples, pc, local)
  loader = input_pipeline.make_eval_loader(config, split, shard_index=jax.process_index(),
                                           shard_count=pc, batch_size=local)
  first = {}
  take = jax.jit(lambda xs: jax.tree.map(lambda x: x[:num_images], xs),
                 out_shardings=sharding.replicated(mesh))

  def predict_and_keep(batch):
    out = predict_fn(batch)
    if num_images and not first:
      logits = out['logits'] if isinstance(out, dict) else out
      first.update(jax.device_get(take(
          {'image': batch['image'], 'logits': logits,
           **{k: batch[k] for k in metrics.PROTOCOL_KEYS[protocol]}})))
    return out
  result = metrics.evaluate_loader(predict_and_keep, loader, mesh=mesh, num_batches=num_batches,
                                   logits_on_canvas=logits_on_canvas, protocol=protocol)
  if not first:
    return result, None
  truth = truth_at_input_size(first, first['image'].shape[1])
  return result, prediction_panels(first['image'], first['logits'], truth)


def truth_at_input_size(arrays, size):
  """The ground truth of an eval batch at the (size, size) input: its 'mask' ('lavt'), or
  'mask_orig' (N, M, M) in its (H, W) = 'orig_size' box sampled at the nearest pixel below."""
  if 'mask' in arrays:
    return np.asarray(arrays['mask'])
  out = []
  for mask, (h, w) in zip(np.asarray(arrays['mask_orig']), np.asarray(arrays['orig_size'])):
    rows, cols = np.arange(size) * h // size, np.arange(size) * w // size
    out.append(mask[rows][:, cols])                                    # (S, S)
  return np.stack(out)


def denormalize(image):
  """(..., 3) ImageNet-normalised float -> uint8 RGB."""
  return np.clip(image * input_pipeline.STD_RGB + input_pipeline.MEAN_RGB, 0, 255).astype(np.uint8)


def overlay(rgb, weight, colour=PREDICTION_RGB, alpha=OVERLAY_ALPHA):
  """Blends `colour` into rgb (H, W, 3) (uint8, or float in [0, 255]) by alpha * weight, weight
  (H, W) in [0, 1] (a bool mask: the colour where True) -> (H, W, 3) uint8, rounded."""
  a = alpha * np.asarray(weight, np.float32)[..., None]
  return (rgb * (1 - a) + colour * a).round().astype(np.uint8)


def prediction_panels(images, logits, truths):
  """(N, S, S, 3) normalised, (N, S/4, S/4), (N, S, S) -> (N, S, 2S, 3) uint8: the prediction
  (logit > 0, each logit a block of pixels) in red on the left, the ground truth in green on the
  right, over the input."""
  out = []
  for image, logit, truth in zip(images, logits, truths):
    rgb = denormalize(image)
    k = rgb.shape[0] // logit.shape[0]
    pred = np.repeat(np.repeat(logit > 0, k, axis=0), k, axis=1)       # (S, S)
    out.append(np.concatenate([overlay(rgb, pred), overlay(rgb, truth > 0, TRUTH_RGB)], axis=1))
  return np.stack(out)
