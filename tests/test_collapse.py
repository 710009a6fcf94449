"""Validation says, in one line, when the N_q queries have collapsed onto one mask."""
import json
import os
import types

import jax
import numpy as np
import pytest
import tqdm

from configs import tiny
from eavl_jax import sharding
from eavl_jax import reporting
from eavl_jax import steps
from eavl_jax import trainer
from eavl_jax.models import builder


def _config(data_dir, change=lambda m: None):
  c = tiny.get_config()
  c.data.data_dir = data_dir
  c.data.eval_max_size = 128
  change(c.model)
  return c


def _validate(config, variables, workdir):
  """trainer.validate on the val split as the loop calls it -> (its metrics, metrics.jsonl rows)."""
  model = builder.build_model(config.model)
  os.makedirs(workdir, exist_ok=True)
  writer = reporting.Writer(str(workdir))
  state = types.SimpleNamespace(variables=lambda: variables)
  result = trainer.validate(config, steps.make_predict_fn(model), state,
                            sharding.make_mesh(config.mesh), 7, writer, tqdm.tqdm(disable=True))
  writer.close()
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return result, [json.loads(line) for line in f]


def _init(config):
  model = builder.build_model(config.model)
  inputs = builder.dummy_inputs(config.model, 1)
  return jax.jit(lambda k: model.init(k, *inputs))(jax.random.key(0))


def _identical_queries(variables):
  """Every output channel of eq. 7's last conv made a copy of channel 0: the N_q dense maps, and
  so the word attentions (eq. 9), the queries (eq. 10) and their kernels, are all the same."""
  params = jax.tree.map(np.array, variables['params'])
  conv = params['query_generator']['reduce_2']
  conv['kernel'][...] = conv['kernel'][..., :1]
  conv['bias'][...] = conv['bias'][:1]
  return {**variables, 'params': params}


def test_identical_queries_are_reported_in_one_warning_line(synthetic_records, tmp_path, capsys):
  config = _config(synthetic_records)
  result, rows = _validate(config, _identical_queries(_init(config)), tmp_path)
  assert result['query_mask_iou'] == pytest.approx(1.0)
  out = capsys.readouterr().out
  warnings = [line for line in out.splitlines() if line.startswith('warning:')]
  assert len(warnings) == 1, out
  assert 'the 4 queries have collapsed on val at step 7: qIoU 100.00%' in warnings[0]
  assert 'docs/training.md' in warnings[0]
  # metrics.jsonl (and TensorBoard, from the same call) carry both diversity figures
  assert rows[-1]['step'] == 7
  assert rows[-1]['val/query_mask_iou'] == pytest.approx(1.0)
  assert 0.0 <= rows[-1]['val/score_entropy'] <= 1.0


def test_no_warning_below_the_threshold_or_without_several_queries(synthetic_records, tmp_path,
                                                                   capsys):
  config = _config(synthetic_records)
  config.eval.collapse_qiou = 1.0   # identical masks reach 1.0: still warned
  _validate(config, _identical_queries(_init(config)), tmp_path / 'same')
  assert 'warning:' in capsys.readouterr().out
  # one query (qIoU is 1 by definition) and the fixed kernel of table III: nothing to warn about
  def one_query(m):
    m.num_queries = 1

  def fixed_kernel(m):
    m.aligner.mode = 'fixed'
  for change in (one_query, fixed_kernel):
    config = _config(synthetic_records, change)
    result, _ = _validate(config, _init(config), tmp_path / change.__name__)
    assert result['query_mask_iou'] == pytest.approx(1.0)
    assert 'warning:' not in capsys.readouterr().out


def test_the_warning_follows_the_threshold():
  config = tiny.get_config()
  result = {'query_mask_iou': 0.89, 'score_entropy': 0.95}
  assert reporting.collapse_warning(config, 'val', 1, result) is None
  config.eval.collapse_qiou = 0.85
  assert 'qIoU 89.00% >= eval.collapse_qiou=85%' in reporting.collapse_warning(
      config, 'val', 1, result)
  assert reporting.collapse_warning(config, 'val', 1, {'oIoU': 0.5}) is None   # no masks reported


def test_query_collapse_tool_measures_what_the_docs_say(synthetic_records):
  """tools/query_collapse.py: with eq. 11's σ linear every query's gradient through eq. 11-12 is
  the same vector (g_kern = 1); with a ReLU it is not; identical queries read as identical at
  every stage."""
  from tools import query_collapse  # pylint: disable=g-import-not-at-top
  config = _config(synthetic_records)
  model = builder.build_model(config.model)
  batch, = query_collapse.fixed_batches(config, 1, seed=0)
  variables = _init(config)
  row = jax.device_get(query_collapse.make_diagnose(config, model)(variables, batch))
  assert row['g_kern'] == pytest.approx(1.0, abs=1e-5)
  assert row['F_q'] < 1.0 - 1e-6 and row['A_tv'] > 0
  same = jax.device_get(query_collapse.make_diagnose(config, model)(
      _identical_queries(variables), batch))
  for key in ('f_vd', 'q', 'F_q', 'W_q', 'g_cos', 'g_kern', 'qIoU'):
    assert same[key] == pytest.approx(1.0, abs=1e-5), key
  assert same['A_tv'] == pytest.approx(0.0, abs=1e-6)

  def relu_kernels(m):
    m.aligner.kernel_activation = 'relu'
  config = _config(synthetic_records, relu_kernels)
  model = builder.build_model(config.model)
  row = jax.device_get(query_collapse.make_diagnose(config, model)(_init(config), batch))
  assert row['g_kern'] < 0.999
