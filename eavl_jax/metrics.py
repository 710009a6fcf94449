"""oIoU, mIoU and Pr@X (§IV-A; docs/evaluation.md), under one of two protocols (eval.protocol):

  'original': the logits are upsampled bilinearly (half-pixel centres, edges clamped) to the
    image's original (H, W) and scored against the original-size mask.
  'lavt' (LAVT's test.py): the logits are upsampled bilinearly with the corners aligned (LAVT's
    model's last F.interpolate, align_corners=True) to the S x S input, and scored against the
    mask resized to S x S with nearest neighbour (the eval batch's 'mask'). `lavt_test` also
    gives test.py's own numbers, computed in its arithmetic (printed digits equal).
Per expression: foreground = logit > 0, I = |pred ∧ gt|, U = |pred ∨ gt|. (LAVT's argmax over
(background, object) takes the first of equal logits: object iff its logit is strictly larger,
i.e. the difference > 0.)
Over a split: oIoU = ΣI / ΣU; mIoU = mean of I/U (an empty union counts 0, as in LAVT's test.py);
Pr@X = share of expressions with I/U ≥ X.

Images of a batch have different sizes, so the work is done on a fixed (M, M) canvas,
M = config.data.eval_max_size: the ground truth sits top-left on it ('mask_orig'), each sample's
logits are resized onto its own (H, W) box of it, and pixels outside the box never count.

Query diversity (how much the N_q query masks of eq. 12 and the estimator's scores of eq. 13
differ), per expression, averaged over a split like mIoU:
  query_mask_iou: mean IoU over the pairs n < m of the binarised query masks (logit > 0), at
    the masks' own resolution (S/4). Two empty masks are identical: IoU 1. N_q = 1: 1.
  score_entropy: H(S) / log N_q of the scores, 1 = uniform, 0 = one query. N_q = 1: 1.
With N_q = 1 both are 1.0 by definition (a single query, no diversity at all).
"""
import functools
import math

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from eavl_jax import resize
from eavl_jax import sharding

THRESHOLDS = (5, 6, 7, 8, 9)  # Pr@0.5 ... Pr@0.9, in tenths (compared exactly in integers)
METRIC_KEYS = ('oIoU', 'mIoU') + tuple(f'Pr@0.{k}' for k in THRESHOLDS)
DIVERSITY_KEYS = ('query_mask_iou', 'score_entropy')
EVAL_KEYS = ('image', 'input_ids', 'attention_mask', 'mask_orig', 'orig_size', 'valid')
# eval.protocol -> what the metric is computed at (docs/evaluation.md).
PROTOCOLS = {'original': "each image's original size", 'lavt': 'the model input size'}
# The ground-truth keys of an eval batch each protocol reads.
PROTOCOL_KEYS = {'original': ('mask_orig', 'orig_size'), 'lavt': ('mask',)}


def check_protocol(protocol):
  """A clear error for an unknown eval.protocol."""
  if protocol not in PROTOCOLS:
    raise ValueError(f'eval.protocol={protocol!r}: expected one of {sorted(PROTOCOLS)}')


def eval_keys(protocol):
  """The keys of an eval batch that go to the devices under `protocol`."""
  check_protocol(protocol)
  return ('image', 'input_ids', 'attention_mask', 'valid') + PROTOCOL_KEYS[protocol]


def upsample_to_canvas(logits, orig_size, canvas_size):
  """logits (B, h, w) covering the whole image -> (B, M, M): each sample resized to its (H, W).

  Bilinear with half-pixel centres and clamped edges (= jax.image.resize, = torch's
  F.interpolate(mode='bilinear', align_corners=False)); values outside the (H, W) box are 0.
  """
  _, h, w = logits.shape
  scale = orig_size.astype(jnp.float32) / jnp.array([h, w], jnp.float32)  # (B, 2)

  def one(x, s):  # (h, w), (2,) -> (M, M)
    return jax.image.scale_and_translate(x, (canvas_size, canvas_size), (0, 1), s,
                                         jnp.zeros(2, jnp.float32), 'linear', antialias=False)
  return jax.vmap(one)(logits.astype(jnp.float32), scale)


def inside_box(orig_size, canvas_size):
  """(B, 2) sizes -> (B, M, M) bool: True inside each sample's top-left (H, W) box."""
  r = jnp.arange(canvas_size)
  rows = r[None, :] < orig_size[:, 0:1]                             # (B, M)
  cols = r[None, :] < orig_size[:, 1:2]                             # (B, M)
  return rows[:, :, None] & cols[:, None, :]


def canvas_intersection_union(foreground, mask_orig, orig_size):
  """foreground (B, M, M) bool, mask_orig (B, M, M) {0,1}, orig_size (B, 2) -> I, U (B,) int32."""
  box = inside_box(orig_size, foreground.shape[-1])
  pred = foreground & box
  gt = (mask_orig > 0) & box
  return (pred & gt).sum((1, 2), dtype=jnp.int32), (pred | gt).sum((1, 2), dtype=jnp.int32)


def batch_intersection_union(logits, mask_orig, orig_size, logits_on_canvas=False):
  """Per-sample intersection and union at the original size; jittable.

  logits: (B, h, w) over the whole (resized, square) image, e.g. the model's S/4 map; or, with
    logits_on_canvas=True, (B, M, M) already at the original size, top-left like mask_orig
    (no resizing: for predictions made elsewhere, and the ground-truth check in the tests).
  mask_orig: (B, M, M) uint8 in {0, 1}; orig_size: (B, 2) int (H, W).
  Returns I, U: (B,) int32.
  """
  m = mask_orig.shape[-1]
  if logits_on_canvas:
    if logits.shape[1:] != (m, m):
      raise ValueError(f'logits_on_canvas needs logits (B, {m}, {m}); got {tuple(logits.shape)}')
    canvas_logits = logits
  else:
    canvas_logits = upsample_to_canvas(logits, orig_size, m)          # (B, M, M)
  return canvas_intersection_union(canvas_logits > 0, mask_orig, orig_size)


def input_size_intersection_union(logits, mask):
  """Per-sample intersection and union at the model's input size (LAVT's test); jittable.

  logits: (B, h, w) over the whole (resized, square) image, e.g. the model's S/4 map.
  mask: (B, S, S) {0, 1}, the ground truth resized to the input size with nearest neighbour.
  The logits are upsampled bilinearly with the corners aligned (LAVT's model) to (S, S);
  foreground = logit > 0 (test.py's argmax of the two classes). Returns I, U: (B,) int32.
  """
  pred = resize.align_corners(logits, *mask.shape[1:]) > 0         # (B, S, S)
  gt = mask > 0                                                     # (B, S, S)
  return (pred & gt).sum((1, 2), dtype=jnp.int32), (pred | gt).sum((1, 2), dtype=jnp.int32)


def summarize(intersections, unions):
  """Per-sample I, U (valid samples only) -> {'oIoU', 'mIoU', 'Pr@0.5'...'Pr@0.9', 'samples'}.

  Fractions in [0, 1]. A split whose unions are all empty has oIoU 0.
  """
  i = np.asarray(intersections, np.int64).reshape(-1)
  u = np.asarray(unions, np.int64).reshape(-1)
  if i.shape != u.shape:
    raise ValueError(f'{i.shape[0]} intersections but {u.shape[0]} unions')
  if np.any(i > u) or np.any(i < 0):
    raise ValueError('every intersection must lie in [0, union]')
  n = int(i.size)
  iou = np.divide(i, u, out=np.zeros(n, np.float64), where=u > 0)  # empty union: IoU 0
  out = {'oIoU': float(i.sum() / u.sum()) if u.sum() else 0.0,
         'mIoU': float(iou.mean()) if n else 0.0}
  for k in THRESHOLDS:  # I/U >= k/10  <=>  10 I >= k U  (exact); an empty union never counts
    hit = (10 * i >= k * u) & (u > 0)
    out[f'Pr@0.{k}'] = float(hit.mean()) if n else 0.0
  out['samples'] = n
  return out


LAVT_THRESHOLDS = (.5, .6, .7, .8, .9)   # test.py's eval_seg_iou_list


def lavt_test(intersections, unions):
  """Per-sample I, U (in test.py's order) -> test.py's numbers, in its arithmetic:
  {'cum_I', 'cum_U', 'seg_total', 'seg_correct' [5], 'Mean IoU', 'precision@0.5' ...
  'precision@0.9', 'overall IoU'} (the last seven in %, as it prints them: mIoU*100.,
  seg_correct*100./seg_total, cum_I*100./cum_U). An empty split or union gives 0."""
  i = np.asarray(intersections, np.int64).reshape(-1)
  u = np.asarray(unions, np.int64).reshape(-1)
  ious = [float(a) * 1.0 / float(b) if b else 0.0 for a, b in zip(i, u)]   # this_iou
  correct = [int(sum(iou >= t for iou in ious)) for t in LAVT_THRESHOLDS]
  n, cum_i, cum_u = len(ious), int(i.sum()), int(u.sum())
  out = {'cum_I': cum_i, 'cum_U': cum_u, 'seg_total': n, 'seg_correct': correct,
         'Mean IoU': float(np.mean(np.array(ious)) * 100.) if n else 0.0}
  for t, c in zip(LAVT_THRESHOLDS, correct):
    out[f'precision@{t}'] = c * 100. / n if n else 0.0
  out['overall IoU'] = cum_i * 100. / cum_u if cum_u else 0.0
  return out


def lavt_test_printout(numbers):
  """`lavt_test`'s numbers -> the lines test.py prints after 'Final results:'."""
  text = 'Mean IoU is %.2f\n' % numbers['Mean IoU'] + '\n'
  for t in LAVT_THRESHOLDS:
    text += '    precision@%s = %.2f\n' % (str(t), numbers[f'precision@{t}'])
  return text + '    overall IoU = %.2f\n' % numbers['overall IoU']


def query_mask_iou(masks):
  """masks (B, N_q, h, w) logits -> (B,) float32: mean IoU of (mask > 0) over the query pairs.

  The IoU of two empty masks is 1 (they are identical); with N_q = 1 (no pair) the result is 1.
  """
  b, n = masks.shape[:2]
  if n == 1:
    return jnp.ones((b,), jnp.float32)
  fg = (masks > 0).reshape(b, n, -1).astype(jnp.float32)                    # (B, N, P)
  inter = jnp.einsum('bnp,bmp->bnm', fg, fg, precision=jax.lax.Precision.HIGHEST)  # (B, N, N)
  area = jnp.diagonal(inter, axis1=1, axis2=2)                              # (B, N)
  union = area[:, :, None] + area[:, None, :] - inter                       # (B, N, N)
  iou = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)          # empty pair: 1
  pairs = jnp.triu(jnp.ones((n, n), jnp.float32), k=1)                      # n < m
  return (iou * pairs).sum((1, 2)) / (n * (n - 1) / 2)


def score_entropy(scores):
  """scores (B, N_q), each row summing to 1 -> (B,) float32 H(S) / log N_q in [0, 1].

  1 = uniform over the queries, 0 = all weight on one; with N_q = 1 the result is 1.
  """
  b, n = scores.shape
  if n == 1:
    return jnp.ones((b,), jnp.float32)
  p = scores.astype(jnp.float32)
  h = -jax.scipy.special.xlogy(p, p).sum(-1)                                # 0 log 0 = 0
  return jnp.clip(h / np.log(n), 0.0, 1.0)


@jax.jit
def _valid_diversity_sums(masks, scores, valid):
  """-> (2,) float32: the sums of query_mask_iou and score_entropy over the valid samples."""
  return jnp.stack([jnp.where(valid, query_mask_iou(masks), 0.0).sum(),
                    jnp.where(valid, score_entropy(scores), 0.0).sum()])


def _padding_like(batch, keys):
  """An all-invalid batch of the same shapes (for a host whose shard ran out first)."""
  return {k: np.zeros_like(np.asarray(batch[k])) for k in keys if k in batch}


@functools.partial(jax.jit, static_argnames=('protocol', 'logits_on_canvas'))
def _valid_intersection_union(logits, truth, valid, protocol, logits_on_canvas):
  """I, U under `protocol` with 0 for the padding (valid=False); compiled once per shape.
  truth: the batch's PROTOCOL_KEYS[protocol]."""
  if protocol == 'lavt':
    i, u = input_size_intersection_union(logits, truth['mask'])
  else:
    i, u = batch_intersection_union(logits, truth['mask_orig'], truth['orig_size'],
                                    logits_on_canvas)
  return jnp.where(valid, i, 0), jnp.where(valid, u, 0)


def evaluate_loader(predict_fn, loader, *, mesh, num_batches=None, logits_on_canvas=False,
                    padding_batch=None, protocol='original'):
  """Runs predict_fn over every batch -> `summarize` of the valid samples (+ DIVERSITY_KEYS).

  predict_fn(batch) -> logits (B, h, w), or a dict {'logits', 'masks' (B, N_q, h', w'),
    'scores' (B, N_q)} (the model's output): then the summary also holds DIVERSITY_KEYS, the
    means over the valid samples (only their per-batch sums come back to the host). It gets a
    dict of global arrays (eval_keys(protocol)), the batch axis split over the mesh
    (sharding.batch_sharding); jit it yourself, with the parameters as an argument (not a
    closed-over constant).
  loader: iterable of host-local numpy batches (the eval batch contract of input_pipeline).
  num_batches: every host must run the same number of steps; if given, a host whose loader is
    shorter continues with all-invalid batches (`padding_batch`, else zeros shaped like its last).
  protocol: 'original' (batch_intersection_union) | 'lavt' (input_size_intersection_union; no
    logits_on_canvas; the result also holds 'lavt_test': test.py's numbers, `lavt_test`).
  Samples with valid=False (the padded tail) never count. Results are gathered over processes.
  A loader whose batches hold 'tokens_dropped' also gives 'truncated_expressions': how many valid
  samples' expressions were cut to max_tokens.
  """
  keys = eval_keys(protocol)
  if logits_on_canvas and protocol != 'original':
    raise ValueError(f"logits_on_canvas needs eval.protocol='original', not {protocol!r}")
  metric = functools.partial(_valid_intersection_union, protocol=protocol,
                             logits_on_canvas=logits_on_canvas)
  inters, unions, valids = [], [], []
  diversity, counted = None, 0   # (2,) sums of DIVERSITY_KEYS; the valid samples they cover
  truncated = None   # valid samples whose expression lost tokens to max_tokens (this host's)
  iterator = iter(loader)
  step = 0
  while num_batches is None or step < num_batches:
    batch = next(iterator, None)
    if batch is None:
      if num_batches is None:
        break
      if padding_batch is None and step == 0:
        raise ValueError('this host got no eval batch at all and no padding_batch was given')
      batch = padding_batch if padding_batch is not None else _padding_like(last, keys)
    last = batch
    if 'tokens_dropped' in batch:
      truncated = (truncated or 0) + int(np.sum((np.asarray(batch['tokens_dropped']) > 0)
                                                & np.asarray(batch['valid'], bool)))
    g = sharding.global_batch({k: batch[k] for k in keys if k in batch}, mesh)
    out = predict_fn(g)
    logits = out['logits'] if isinstance(out, dict) else out
    i, u = metric(logits, {k: g[k] for k in PROTOCOL_KEYS[protocol]}, g['valid'])
    i, u, v = multihost_utils.process_allgather((i, u, g['valid']), tiled=True)
    if isinstance(out, dict) and 'masks' in out and 'scores' in out:
      sums = multihost_utils.process_allgather(
          _valid_diversity_sums(out['masks'], out['scores'], g['valid']), tiled=True)
      diversity = np.asarray(sums, np.float64) + (0 if diversity is None else diversity)
      counted += int(np.sum(v))
    inters.append(np.asarray(i))
    unions.append(np.asarray(u))
    valids.append(np.asarray(v, bool))
    step += 1
  if num_batches is not None and next(iterator, None) is not None:
    raise ValueError(f'the loader yields more than num_batches={num_batches} batches')
  if not inters:
    return summarize([], [])
  valid = np.concatenate(valids)
  i, u = np.concatenate(inters)[valid], np.concatenate(unions)[valid]
  result = summarize(i, u)
  if protocol == 'lavt':
    result['lavt_test'] = lavt_test(i, u)
  if truncated is not None:
    result['truncated_expressions'] = int(np.sum(multihost_utils.process_allgather(
        np.asarray([truncated], np.int64), tiled=True)))
  if diversity is not None:   # no valid sample: 0, like the other metrics
    result.update({k: float(x / counted) if counted else 0.0
                   for k, x in zip(DIVERSITY_KEYS, diversity)})
  return result


def num_eval_batches(num_examples, process_count, local_batch_size):
  """Steps every host runs when each of `process_count` shards holds at most ⌈N / P⌉ examples."""
  return math.ceil(math.ceil(num_examples / process_count) / local_batch_size)
