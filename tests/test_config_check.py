"""The whole config checked before any slow work (eavl_jax/config_check.py): unset pretrained
encoders, and bad values refused before data are generated, read or anything is compiled."""
import pytest

from configs import refcoco
from configs import synthetic
from configs import tiny
from eavl_jax import checkpointing
from eavl_jax import config_check
from eavl_jax import evaluate
from eavl_jax import predict
from eavl_jax import synthetic_task
from eavl_jax import train


@pytest.fixture
def no_slow_work(monkeypatch):
  """Makes generating / reading the data, and restoring a checkpoint, fail the test if reached."""
  def reached(*args, **kwargs):
    raise AssertionError('slow work started before the config was refused')
  monkeypatch.setattr(synthetic_task, 'prepare', reached)
  monkeypatch.setattr(checkpointing, 'restore_variables', reached)


def test_unset_swin_is_refused_naming_the_key_and_how_to_set_it(no_slow_work, tmp_path):
  config = refcoco.get_config()                     # vision_encoder.pretrained = '' in base.py
  with pytest.raises(ValueError) as e:
    train.run(config, str(tmp_path))
  message = str(e.value)
  assert "model.vision_encoder.pretrained is ''" in message and '\n' not in message
  assert '--config.model.vision_encoder.pretrained=' in message and "'scratch'" in message
  assert 'model.text_encoder.pretrained' not in message   # bert-base-uncased is set
  assert not (tmp_path / 'data').exists()


def test_unset_bert_is_refused_naming_the_key_and_how_to_set_it():
  config = tiny.get_config()
  config.model.text_encoder.pretrained = ''
  with pytest.raises(ValueError) as e:
    config_check.validate(config, training=True)
  message = str(e.value)
  assert "model.text_encoder.pretrained is ''" in message
  assert "'bert-base-uncased'" in message and "'scratch'" in message
  assert 'model.vision_encoder.pretrained' not in message
  config_check.validate(config)        # evaluate, predict, model_info: no weights are loaded

  config.model.vision_encoder.pretrained = ''   # both: one message naming both keys
  with pytest.raises(ValueError, match=r"vision_encoder.pretrained is ''.*"
                                       r"text_encoder.pretrained is ''"):
    config_check.validate(config, training=True)


def test_scratch_on_purpose_and_encoders_made_or_loaded_otherwise_pass():
  config = tiny.get_config()
  assert config.model.vision_encoder.pretrained == config.model.text_encoder.pretrained == 'scratch'
  config_check.validate(config, training=True)
  config_check.validate(synthetic.get_config(), training=True)
  made = tiny.get_config()                   # the Swin pretrained by this command (synthetic)
  made.model.vision_encoder.pretrained = ''
  made.pretrain.vision_steps, made.pretrain.warmup_steps = 10, 2
  config_check.validate(made, training=True)
  made.model.vision_encoder.pretrained = '/data/swin.pth'   # would be silently replaced
  with pytest.raises(ValueError, match=r"model.vision_encoder.pretrained='/data/swin.pth': "
                                       r'pretrain.vision_steps=10 makes'):
    config_check.validate(made, training=True)
  lavt = refcoco.get_config()                 # a released LAVT checkpoint holds both encoders
  lavt.model.name = 'lavt'
  lavt.model.lavt.pretrained = '/data/lavt_refcoco.pth'
  config_check.validate(lavt, training=True)


def test_scratch_text_encoder_needs_a_tokenizer():
  config = tiny.get_config()
  config.model.text_encoder.tokenizer = ''
  with pytest.raises(ValueError, match=r"model.text_encoder.tokenizer='': "
                                       r"text_encoder.pretrained='scratch' holds no tokenizer"):
    config_check.validate(config)


@pytest.mark.parametrize('key, value, match', [
    ('model.num_queries', 0, 'model.num_queries=0'),
    ('model.decoder.num_heads', 3, r'model.decoder.num_heads=3: must divide model.hidden_dim'),
    ('model.vision_encoder.num_heads', (1, 3, 2, 4), r'num_heads\[1\]=3'),
    ('optim.text_encoder_trainable_layers', 3, r'optim.text_encoder_trainable_layers=3: must be '
                                               r'-1 \(all of BERT\) or 0..2'),
    ('optim.weight_decay_exempt', 'biases', "optim.weight_decay_exempt='biases'"),
    ('optim.lr_multipliers', (('text_encoder/(', 0.0),), 'is not a regex'),
    ('optim.learning_rate', 0.0, 'optim.learning_rate=0.0'),
    ('loss.name', 'focal', "loss.name='focal'"),
    ('data.sentences', 'first', "data.sentences='first'"),
    ('data.dataset', 'refclef', "data.dataset='refclef'"),
    ('train.global_batch_size', 0, 'train.global_batch_size=0'),
    ('train.log_every_steps', 0, 'train.log_every_steps=0'),
    ('eval.protocol', 'cris', "eval.protocol='cris'"),
    ('mesh.param_sharding', 'zero', "mesh.param_sharding='zero'"),
])
def test_bad_value_refused_before_any_slow_work(key, value, match, no_slow_work, tmp_path):
  """train (synthetic data to generate), evaluate and predict all stop at the config."""
  config = synthetic.get_config()
  section, name = key.rsplit('.', 1)
  parent = config
  for part in section.split('.'):
    parent = parent[part]
  parent[name] = value
  with pytest.raises(ValueError, match=match):
    train.run(config, str(tmp_path / 'train'))
  assert not (tmp_path / 'train').exists()
  with pytest.raises(ValueError, match=match):
    evaluate.run(config, str(tmp_path / 'eval'))
  with pytest.raises(ValueError, match=match):
    predict.run(config, str(tmp_path / 'eval'), 'no_image.jpg', 'a', str(tmp_path / 'out.png'))
