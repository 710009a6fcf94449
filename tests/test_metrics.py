"""The metric code against pycocotools' maskUtils.iou, torch's bilinear resize and plain numpy."""
import jax
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import pytest
import torch

from configs import base
from eavl_jax import metrics
from eavl_jax import sharding

CANVAS = 48


def numpy_summary(ious_or_iu):
  """Plain-numpy reference of DESIGN.md's definitions from a list of (I, U) pairs."""
  i = np.array([p[0] for p in ious_or_iu], np.float64)
  u = np.array([p[1] for p in ious_or_iu], np.float64)
  iou = np.array([a / b if b > 0 else 0.0 for a, b in zip(i, u)])
  ref = {'oIoU': i.sum() / u.sum(), 'mIoU': iou.mean(), 'samples': len(iou)}
  for x in (0.5, 0.6, 0.7, 0.8, 0.9):
    ref[f'Pr@{x}'] = np.mean([v >= x - 1e-12 for v in iou])  # ">=", exact fractions included
  return ref


def random_masks(rng, n):
  """n (pred, gt) pairs of random sizes; some empty, some identical, some disjoint."""
  pairs = []
  for k in range(n):
    h, w = rng.integers(1, 30, size=2)
    pred = rng.random((h, w)) < rng.random()
    gt = rng.random((h, w)) < rng.random()
    if k % 7 == 0:
      pred[:] = False
    if k % 11 == 0:
      gt[:] = False
    if k % 13 == 0:
      pred = gt.copy()
    pairs.append((pred, gt))
  return pairs


def on_canvas(masks, m=CANVAS):
  out = np.zeros((len(masks), m, m), np.uint8)
  for k, x in enumerate(masks):
    out[k, :x.shape[0], :x.shape[1]] = x
  return out


def test_canvas_iou_equals_pycocotools_and_numpy():
  rng = np.random.default_rng(0)
  pairs = random_masks(rng, 60)
  pairs.append((np.zeros((5, 4), bool), np.zeros((5, 4), bool)))  # both empty: IoU 0
  pred, gt = on_canvas([p for p, _ in pairs]), on_canvas([g for _, g in pairs])
  pred[:, -1, :] = 1  # foreground outside every (H, W) box must not count
  sizes = np.array([g.shape for _, g in pairs], np.int32)
  i, u = jax.jit(metrics.canvas_intersection_union)(pred > 0, gt, sizes)
  i, u = np.asarray(i), np.asarray(u)
  for k, (p, g) in enumerate(pairs):
    assert i[k] == np.logical_and(p, g).sum() and u[k] == np.logical_or(p, g).sum()
    rle = lambda a: mask_utils.encode(np.asfortranarray(a.astype(np.uint8)))
    coco_iou = mask_utils.iou([rle(p)], [rle(g)], [0])[0, 0]
    assert metrics.summarize(i[k:k + 1], u[k:k + 1])['mIoU'] == pytest.approx(coco_iou, abs=1e-12)
  got = metrics.summarize(i, u)
  ref = numpy_summary(list(zip(i, u)))
  assert got.keys() == set(metrics.METRIC_KEYS) | {'samples'}
  for key, value in ref.items():
    assert got[key] == pytest.approx(value, abs=1e-12), key


def test_precision_thresholds_are_inclusive_and_empty_union_is_zero():
  # IoUs 1/2, 3/5, 7/10, 4/5, 9/10, 1, 0/0 (empty union) and 0.
  i = np.array([1, 3, 7, 4, 9, 5, 0, 0])
  u = np.array([2, 5, 10, 5, 10, 5, 0, 6])
  got = metrics.summarize(i, u)
  assert got['samples'] == 8
  assert got['Pr@0.5'] == 6 / 8 and got['Pr@0.6'] == 5 / 8 and got['Pr@0.7'] == 4 / 8
  assert got['Pr@0.8'] == 3 / 8 and got['Pr@0.9'] == 2 / 8
  assert got['mIoU'] == pytest.approx((0.5 + 0.6 + 0.7 + 0.8 + 0.9 + 1.0) / 8)
  assert got['oIoU'] == pytest.approx(29 / 43)
  with pytest.raises(ValueError, match='intersection'):
    metrics.summarize([3], [2])


def torch_upsample(logits, size, align_corners=False):
  x = torch.from_numpy(logits.astype(np.float64))[None, None]
  return torch.nn.functional.interpolate(x, size=tuple(int(s) for s in size), mode='bilinear',
                                         align_corners=align_corners)[0, 0].numpy()


def test_upsample_and_threshold_match_torch_bilinear():
  rng = np.random.default_rng(1)
  b, h, w = 6, 8, 8
  logits = rng.normal(size=(b, h, w)).astype(np.float32)
  # Up, down (smaller than the logit map), non-square, and the full canvas.
  sizes = np.array([[37, 21], [5, 6], [8, 8], [CANVAS, CANVAS], [30, CANVAS], [1, 1]], np.int32)
  gts = [rng.random(s) < 0.4 for s in sizes]
  canvas = np.asarray(jax.jit(metrics.upsample_to_canvas, static_argnums=2)(logits, sizes, CANVAS))
  i, u = jax.jit(metrics.batch_intersection_union)(logits, on_canvas(gts), sizes)
  for k, (hh, ww) in enumerate(sizes):
    ref = torch_upsample(logits[k], (hh, ww))
    np.testing.assert_allclose(canvas[k, :hh, :ww], ref, atol=1e-5)
    assert not canvas[k, hh:].any() and not canvas[k, :, ww:].any()
    ambiguous = int((np.abs(ref) < 1e-5).sum())  # pixels whose sign rounding could flip
    pred = ref > 0
    assert abs(int(i[k]) - np.logical_and(pred, gts[k]).sum()) <= ambiguous
    assert abs(int(u[k]) - np.logical_or(pred, gts[k]).sum()) <= ambiguous


def test_logits_on_canvas_reproduce_ground_truth():
  rng = np.random.default_rng(2)
  gts = [rng.random((20, 33)) < 0.5, np.zeros((7, 9), bool), rng.random((CANVAS, 3)) < 0.5]
  mask = on_canvas(gts)
  sizes = np.array([g.shape for g in gts], np.int32)
  i, u = metrics.batch_intersection_union(mask * 2.0 - 1.0, mask, sizes, logits_on_canvas=True)
  got = metrics.summarize(i, u)
  assert got['samples'] == 3 and got['oIoU'] == 1.0
  assert got['mIoU'] == pytest.approx(2 / 3)  # the empty ground truth: empty union, IoU 0


class ListLoader:
  def __init__(self, batches):
    self.batches = batches

  def __iter__(self):
    return iter(self.batches)


def make_batch(rng, b, valid):
  sizes = rng.integers(4, CANVAS, size=(b, 2)).astype(np.int32)
  gts = [rng.random(s) < 0.5 for s in sizes]
  return {'image': np.zeros((b, 8, 8, 3), np.float32), 'input_ids': np.zeros((b, 4), np.int32),
          'attention_mask': np.ones((b, 4), np.int32), 'mask_orig': on_canvas(gts),
          'orig_size': sizes, 'valid': np.asarray(valid, bool)}


def test_evaluate_loader_counts_valid_samples_only():
  rng = np.random.default_rng(3)
  mesh = sharding.make_mesh(base.get_config().mesh)
  batches = [make_batch(rng, 4, [True] * 4), make_batch(rng, 4, [True, True, False, False])]
  noisy = {id(b): rng.normal(size=(4, CANVAS, CANVAS)).astype(np.float32) for b in batches}
  for b in batches:  # the padded samples predict noise: they must change nothing
    noisy[id(b)][b['valid']] = b['mask_orig'][b['valid']] * 2.0 - 1.0
  queue = [noisy[id(b)] for b in batches]
  predict = lambda g: queue.pop(0)
  got = metrics.evaluate_loader(predict, ListLoader(batches), mesh=mesh, logits_on_canvas=True)
  assert got['samples'] == 6
  assert got['oIoU'] == 1.0 and got['mIoU'] == 1.0 and got['Pr@0.9'] == 1.0
  assert 'truncated_expressions' not in got   # the loader said nothing about tokens

  # Expressions cut to max_tokens are counted, padding never: valid samples 1 and 4 lost tokens.
  batches[0]['tokens_dropped'] = np.asarray([0, 3, 0, 0], np.int32)
  batches[1]['tokens_dropped'] = np.asarray([0, 1, 5, 0], np.int32)   # sample 2: padding
  got = metrics.evaluate_loader(lambda g: -np.ones((4, 8, 8), np.float32), ListLoader(batches),
                                mesh=mesh)
  assert got['truncated_expressions'] == 2

  # A shorter shard is padded with invalid batches up to num_batches; those never count.
  background = lambda g: -np.ones((4, 8, 8), np.float32)
  got = metrics.evaluate_loader(background, ListLoader(batches), mesh=mesh, num_batches=3)
  assert got['samples'] == 6 and got['oIoU'] == 0.0 and got['Pr@0.5'] == 0.0
  with pytest.raises(ValueError, match='num_batches'):
    metrics.evaluate_loader(background, ListLoader(batches), mesh=mesh, num_batches=1)


def test_query_mask_iou_on_hand_made_masks():
  on = lambda *rows: np.where(np.array(rows, bool), 3.0, -3.0)   # binary mask -> logits (h, w)
  a, b, c = on([1, 1, 0], [0, 0, 0]), on([1, 0, 0], [0, 0, 0]), on([0, 1, 1], [0, 0, 0])
  empty = on([0, 0, 0], [0, 0, 0])
  masks = np.stack([[a, a, a],              # identical: 1
                    [a, on([0, 0, 1], [1, 1, 1]), empty],   # disjoint, empty vs. not: 0
                    [a, b, c],              # IoUs 1/2 (a, b), 1/3 (a, c), 0 (b, c)
                    [empty, empty, empty]])  # two empty masks are identical: 1
  got = np.asarray(jax.jit(metrics.query_mask_iou)(masks))
  np.testing.assert_allclose(got, [1.0, 0.0, (1 / 2 + 1 / 3 + 0) / 3, 1.0], atol=1e-6)
  assert got.shape == (4,) and got.dtype == np.float32
  np.testing.assert_array_equal(metrics.query_mask_iou(masks[:, :1]), [1.0] * 4)  # N_q = 1: 1


def test_score_entropy_uniform_one_and_one_hot_zero():
  scores = np.array([[0.25] * 4, [0, 1, 0, 0], [0.5, 0.5, 0, 0], [0.7, 0.1, 0.1, 0.1]],
                    np.float32)
  ref = -(0.7 * np.log(0.7) + 3 * 0.1 * np.log(0.1)) / np.log(4)
  got = np.asarray(jax.jit(metrics.score_entropy)(scores))
  np.testing.assert_allclose(got, [1.0, 0.0, 0.5, ref], atol=1e-6)
  np.testing.assert_array_equal(metrics.score_entropy(np.ones((3, 1))), [1.0] * 3)  # N_q = 1


def test_evaluate_loader_diversity_counts_valid_samples_only():
  rng = np.random.default_rng(4)
  mesh = sharding.make_mesh(base.get_config().mesh)
  batches = [make_batch(rng, 4, [True] * 4), make_batch(rng, 4, [True, True, False, False])]
  left = np.zeros((8, 8), np.float32)
  left[:, :4] = 1
  same, apart = np.stack([left, left]) - 0.5, np.stack([left, 1 - left]) - 0.5  # (2, 8, 8)
  uniform, one_hot = np.array([0.5, 0.5], np.float32), np.array([1, 0], np.float32)
  # Valid: IoUs 1, 0, 1, 0 | 0, 0 and entropies 1, 1, 1, 1 | 0, 0; the padding has 1 and 1.
  masks = [np.stack([same, apart, same, apart]), np.stack([apart, apart, same, same])]
  scores = [np.stack([uniform] * 4), np.stack([one_hot, one_hot, uniform, uniform])]
  logits = -np.ones((4, 8, 8), np.float32)
  for num_batches in (None, 3):   # 3: a whole padding batch (IoU 1, entropy 1) comes on top
    queue = [{'logits': logits, 'masks': m, 'scores': s} for m, s in zip(masks, scores)]
    queue.append({'logits': logits, 'masks': masks[1][2:].repeat(2, 0),
                  'scores': scores[1][2:].repeat(2, 0)})
    got = metrics.evaluate_loader(lambda g: queue.pop(0), ListLoader(batches), mesh=mesh,
                                  num_batches=num_batches)
    assert got['samples'] == 6 and got['oIoU'] == 0.0
    assert got['query_mask_iou'] == pytest.approx(2 / 6)
    assert got['score_entropy'] == pytest.approx(4 / 6)
  # A predict_fn returning bare logits: the same metrics, no diversity figures.
  got = metrics.evaluate_loader(lambda g: logits, ListLoader(batches), mesh=mesh)
  assert got.keys() == set(metrics.METRIC_KEYS) | {'samples'}


def pil_nearest(mask, size):
  """(H, W) bool -> (size, size) uint8 {0, 1}: PIL's nearest-neighbour resize, the resize of the
  ground truth in LAVT's test (torchvision on a PIL image) and in our eval pipeline."""
  return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.NEAREST))


def coco_iou(pred, gt):
  """pycocotools' IoU of two bool masks; an empty union counts 0 (LAVT's rule)."""
  if not (pred | gt).any():
    return 0.0
  rle = lambda a: mask_utils.encode(np.asfortranarray(a.astype(np.uint8)))
  return float(mask_utils.iou([rle(pred)], [rle(gt)], [0])[0, 0])


def test_protocols_on_a_thin_object_that_vanishes_at_the_input_size():
  s, rng = 16, np.random.default_rng(5)
  line = np.zeros((40, 32), bool)
  line[10, 4:28] = True    # one row: PIL's nearest 40 -> 16 keeps rows 1, 3, 6, 8, 11, ... only
  blob = np.zeros((37, 45), bool)
  blob[8:28, 5:21] = True
  gts = [line, blob, rng.random((21, 30)) < 0.3, rng.random((33, CANVAS)) < 0.5]
  logits = rng.normal(size=(len(gts), s // 4, s // 4)).astype(np.float32)   # (B, S/4, S/4)
  logits[0] = -3.0
  logits[0, 1] = 3.0       # a band over the line: rows 10 ... 19 of the original 40
  n = len(gts)
  batch = {'image': np.zeros((n, s, s, 3), np.float32), 'input_ids': np.zeros((n, 4), np.int32),
           'attention_mask': np.ones((n, 4), np.int32), 'mask_orig': on_canvas(gts),
           'orig_size': np.array([g.shape for g in gts], np.int32),
           'mask': np.stack([pil_nearest(g, s) for g in gts]), 'valid': np.ones(n, bool)}
  assert batch['mask'][0].sum() == 0 and batch['mask'][1].sum() > 0   # the line has vanished
  # References: torch's bilinear resize (half-pixel; 'lavt': corners aligned, as LAVT's model),
  # logit > 0, at each protocol's size.
  references = {
      'original': [(torch_upsample(x, g.shape), g) for x, g in zip(logits, gts)],
      'lavt': [(torch_upsample(x, (s, s), True), m > 0) for x, m in zip(logits, batch['mask'])]}
  mesh = sharding.make_mesh(base.get_config().mesh)
  got = {}
  for protocol, pairs in references.items():
    assert all(np.abs(up).min() > 1e-4 for up, _ in pairs)   # no pixel whose sign could flip
    pairs = [(up > 0, gt) for up, gt in pairs]
    references[protocol] = pairs
    got[protocol] = metrics.evaluate_loader(lambda g: logits, ListLoader([batch]), mesh=mesh,
                                            protocol=protocol)
    ref = numpy_summary([(np.sum(p & g), np.sum(p | g)) for p, g in pairs])
    for key, value in ref.items():
      assert got[protocol][key] == pytest.approx(value, abs=1e-12), (protocol, key)
    assert got[protocol]['mIoU'] == pytest.approx(np.mean([coco_iou(p, g) for p, g in pairs]))
  # The right answers differ: at the original size the band finds the line (24 of its 10 x 32
  # pixels); at 16² the line is gone, and the band is all error.
  assert coco_iou(*references['original'][0]) == pytest.approx(24 / 320)
  assert coco_iou(*references['lavt'][0]) == 0.0
  assert got['original']['mIoU'] != pytest.approx(got['lavt']['mIoU'])
  assert got['original']['oIoU'] != pytest.approx(got['lavt']['oIoU'])


# ---------------------------------------------------------------- LAVT's test.py, transcribed


def lavt_test_py(outputs, targets):
  """LAVT-RIS test.py's `evaluate` after the model, in torch: each output (1, 2, h, w) (the
  classifier's (background, object) map) upsampled as LAVT's model ends (F.interpolate, bilinear,
  align_corners=True) to the target's (1, S, S), argmax over the classes, then its
  computeIoU, cum_I / cum_U, mean_IoU and seg_correct. -> the text it prints after 'Final
  results:'."""
  cum_i, cum_u, mean_iou = 0, 0, []
  eval_seg_iou_list = [.5, .6, .7, .8, .9]
  seg_correct = np.zeros(len(eval_seg_iou_list), dtype=np.int32)
  seg_total = 0
  for output, target in zip(outputs, targets):
    output = torch.nn.functional.interpolate(output, size=target.shape[-2:], mode='bilinear',
                                             align_corners=True)
    output_mask = output.argmax(1).data.numpy()
    i = np.sum(np.logical_and(output_mask, target))
    u = np.sum(np.logical_or(output_mask, target))
    this_iou = 0.0 if u == 0 else i * 1.0 / u
    mean_iou.append(this_iou)
    cum_i += i
    cum_u += u
    for n, eval_seg_iou in enumerate(eval_seg_iou_list):
      seg_correct[n] += (this_iou >= eval_seg_iou)
    seg_total += 1
  text = 'Mean IoU is %.2f\n' % (np.mean(np.array(mean_iou)) * 100.) + '\n'
  for n, eval_seg_iou in enumerate(eval_seg_iou_list):
    text += '    precision@%s = %.2f\n' % (str(eval_seg_iou), seg_correct[n] * 100. / seg_total)
  return text + '    overall IoU = %.2f\n' % (cum_i * 100. / cum_u)


def random_predictions(rng, n, s):
  """n random (background, object) maps (2, s/4, s/4) float32 and (s, s) targets: noisy
  ellipses where the object's logit leads; #1 has equal logits on its left half (a tie: test.py's
  argmax says background); #2 predicts nothing on an empty target (empty union)."""
  h = s // 4
  yy, xx = np.mgrid[:s, :s] / s
  yl, xl = np.mgrid[:h, :h] / h
  outputs, targets = [], []
  for k in range(n):
    cy, cx, ry, rx = rng.uniform(0.3, 0.7, 2).tolist() + rng.uniform(0.1, 0.3, 2).tolist()
    target = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1                  # (s, s)
    jitter = rng.uniform(-0.05, 0.05, 4)
    inside = ((yl - cy - jitter[0]) / (ry + jitter[2])) ** 2 + \
        ((xl - cx - jitter[1]) / (rx + jitter[3])) ** 2
    background = rng.normal(size=(h, h)).astype(np.float32)
    obj = (background + 2.0 * (1.0 - inside) + rng.normal(scale=1.5, size=(h, h))).astype(np.float32)
    if k == 1:
      obj[:, :h // 2] = background[:, :h // 2]
    if k == 2:
      target[:], obj = False, background - 5.0
    outputs.append(np.stack([background, obj])[None])                           # (1, 2, h, h)
    targets.append(target[None].astype(np.int64))                               # (1, s, s)
  return outputs, targets


def test_protocol_lavt_prints_the_digits_of_lavts_test_py():
  s, n, per_batch = 480, 40, 8
  outputs, targets = random_predictions(np.random.default_rng(6), n, s)
  reference = lavt_test_py([torch.from_numpy(o) for o in outputs], targets)
  diff = np.concatenate([o[:, 1] - o[:, 0] for o in outputs])   # (n, s/4, s/4): object - background
  mask = np.concatenate(targets).astype(np.uint8)                                # (n, s, s)
  batches = [{'image': np.zeros((per_batch, 8, 8, 3), np.float32),
              'input_ids': np.zeros((per_batch, 4), np.int32),
              'attention_mask': np.ones((per_batch, 4), np.int32),
              'mask': mask[j:j + per_batch], 'valid': np.ones(per_batch, bool)}
             for j in range(0, n, per_batch)]
  queue = [diff[j:j + per_batch] for j in range(0, n, per_batch)]
  mesh = sharding.make_mesh(base.get_config().mesh)
  got = metrics.evaluate_loader(lambda g: queue.pop(0), ListLoader(batches), mesh=mesh,
                                protocol='lavt')
  assert metrics.lavt_test_printout(got['lavt_test']) == reference
  numbers = got['lavt_test']
  assert numbers['seg_total'] == got['samples'] == n
  assert numbers['overall IoU'] == pytest.approx(100 * got['oIoU'])
  assert numbers['Mean IoU'] == pytest.approx(100 * got['mIoU'])
  for t in metrics.THRESHOLDS:
    assert numbers[f'precision@0.{t}'] == pytest.approx(100 * got[f'Pr@0.{t}'])
  # Pixel by pixel: the foreground is torch's argmax except where the upsampled difference is
  # within float32 rounding of 0; the tie of #1 is background, as in torch.
  ours = np.asarray(metrics.resize.align_corners(diff, s, s))
  for k in range(n):
    up = torch.nn.functional.interpolate(torch.from_numpy(outputs[k]), size=(s, s),
                                         mode='bilinear', align_corners=True)[0]
    torch_mask = up.argmax(0).numpy() == 1
    near_zero = np.abs((up[1] - up[0]).numpy()) < 1e-5
    assert ((ours[k] > 0) == torch_mask)[~near_zero].all(), k
  assert not (ours[1][:, :s // 2 - 4] > 0).any()
  # The test can tell: half-pixel centres (the protocol before) print other digits.
  half = np.asarray(jax.image.resize(diff, (n, s, s), 'linear', antialias=False)) > 0
  gt = mask > 0
  i_half, u_half = (half & gt).sum((1, 2)), (half | gt).sum((1, 2))
  assert metrics.lavt_test_printout(metrics.lavt_test(i_half, u_half)) != reference


def test_lavt_test_arithmetic_on_hand_made_counts():
  got = metrics.lavt_test([7, 0, 3, 0], [10, 4, 3, 0])     # IoUs 0.7, 0, 1, 0 (empty union)
  assert got['seg_correct'] == [2, 2, 2, 1, 1] and got['seg_total'] == 4
  assert got['Mean IoU'] == np.mean([0.7, 0.0, 1.0, 0.0]) * 100.
  assert got['overall IoU'] == 10 * 100. / 17 and got['precision@0.7'] == 2 * 100. / 4
  assert metrics.lavt_test_printout(got).splitlines()[0] == 'Mean IoU is 42.50'


def test_unknown_protocol_is_one_clear_error():
  with pytest.raises(ValueError, match=r"eval.protocol='cris': expected one of \['lavt', "):
    metrics.check_protocol('cris')
  with pytest.raises(ValueError, match='logits_on_canvas'):
    metrics.evaluate_loader(None, [], mesh=None, logits_on_canvas=True, protocol='lavt')


def test_num_eval_batches():
  assert metrics.num_eval_batches(10, 1, 4) == 3
  assert metrics.num_eval_batches(10, 3, 2) == 2  # shards of at most 4 examples
  assert metrics.num_eval_batches(8, 2, 4) == 1
