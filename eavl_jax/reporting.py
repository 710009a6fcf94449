"""What a run reports: the validation table and the collapse warning as printed, and the
scalars written to TensorBoard (<workdir>/tb) and <workdir>/metrics.jsonl."""
import json
import os

import jax

from eavl_jax import metrics as metrics_lib


def multi_query_head(model_config):
  """True when the head draws N_q > 1 masks (qIoU and S-ent then say something)."""
  m = model_config
  if m.name == 'lavt' and m.lavt.head != 'aligner':
    return False
  return m.num_queries > 1 and m.aligner.mode == 'aligner'


def collapse_warning(config, split, step, result):
  """One line when the queries draw nearly the same mask (qIoU >= eval.collapse_qiou), else None."""
  qiou = result.get('query_mask_iou')
  if qiou is None or not multi_query_head(config.model) or qiou < config.eval.collapse_qiou:
    return None
  return (f'warning: the {config.model.num_queries} queries have collapsed on {split} at step '
          f'{step}: qIoU {100 * qiou:.2f}% >= eval.collapse_qiou={100 * config.eval.collapse_qiou:g}% '
          f'(S-ent {100 * result["score_entropy"]:.2f}%), so they draw nearly one mask and the '
          'aligner works as a single kernel (table III\'s fixed row); what it means and what to '
          'try: docs/training.md, "When the queries collapse"')


def format_table(split, step, result):
  """METRIC_KEYS' columns, then qIoU (query_mask_iou) and S-ent (score_entropy); '-': absent."""
  keys = metrics_lib.METRIC_KEYS + metrics_lib.DIVERSITY_KEYS
  names = metrics_lib.METRIC_KEYS + ('qIoU', 'S-ent')
  head = ' '.join(f'{k:>7}' for k in names)
  row = ' '.join(f'{100 * result[k]:7.2f}' if k in result else f'{"-":>7}' for k in keys)
  return (f'validation on {split} ({result["samples"]} expressions, step {step}), in %:\n'
          f'{head}\n{row}')


class Writer:
  """TensorBoard (workdir/tb) and workdir/metrics.jsonl, on process 0 only."""

  def __init__(self, workdir):
    self._active = jax.process_index() == 0
    if self._active:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (process 0 only; loads protobuf)
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tb'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def scalars(self, step, values):
    if not self._active:
      return
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self._jsonl.flush()

  def images(self, step, name, images):
    if self._active and images is not None:
      self._tb.add_images(name, images, step, dataformats='NHWC')

  def close(self):
    if self._active:
      self._tb.close()
      self._jsonl.close()
