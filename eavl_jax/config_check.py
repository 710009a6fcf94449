"""The whole config, checked before any slow work (docs/training.md, "Checked before any work").

Every entry point (train, evaluate, predict, model_info, convert, benchmarks.ablations) calls
`validate` first: a bad value raises ValueError naming the key, which the command prints as one
`error: ...` line, before data are generated or read, weights loaded or anything compiled.
`validate(config, training=True)` also refuses an encoder that would start from random weights
without the config saying so (`check_pretrained`).
"""
import os
import re

from eavl_jax.data import refer
from eavl_jax import hub
from eavl_jax import losses
from eavl_jax import metrics
from eavl_jax import optim
from eavl_jax import run_sizes
from eavl_jax import sharding
from eavl_jax.models import builder
from eavl_jax.weights import bert as bert_weights
from eavl_jax.weights import files as weight_files
from eavl_jax.weights import swin as swin_weights

SENTENCES = ('random', 'all')            # data.sentences
TARGET_RESIZES = ('nearest', 'area')     # loss.target_resize


def _require(ok, key, value, why):
  if not ok:
    raise ValueError(f'{key}={value!r}: {why}')


def _divides(key, value, width, what):
  _require(value >= 1 and width % value == 0, key, value, f'must divide {what} ({width})')


def check_model(m):
  """What builder.build_model would refuse, and the head counts that must divide their widths."""
  builder.validate_config(m)
  v, t = m.vision_encoder, m.text_encoder
  for i, heads in enumerate(v.num_heads):
    _divides(f'model.vision_encoder.num_heads[{i}]', heads, v.embed_dim * 2 ** i,
             f'the stage width vision_encoder.embed_dim * 2^{i}')
  _divides('model.vision_encoder.pool_heads', v.pool_heads, 8 * v.embed_dim,
           'the last stage width 8 * vision_encoder.embed_dim')
  _require(v.window_size >= 1, 'model.vision_encoder.window_size', v.window_size, 'must be >= 1')
  _divides('model.text_encoder.num_attention_heads', t.num_attention_heads, t.hidden_size,
           'text_encoder.hidden_size')
  _divides('model.decoder.num_heads', m.decoder.num_heads, m.hidden_dim, 'model.hidden_dim')
  _divides('model.aligner.estimator_heads', m.aligner.estimator_heads, m.hidden_dim,
           'model.hidden_dim')
  for key, rate in (('vision_encoder.drop_path_rate', v.drop_path_rate),
                    ('text_encoder.hidden_dropout_prob', t.hidden_dropout_prob),
                    ('text_encoder.attention_probs_dropout_prob', t.attention_probs_dropout_prob),
                    ('decoder.dropout', m.decoder.dropout)):
    _require(0 <= rate < 1, f'model.{key}', rate, 'must lie in [0, 1)')
  _require(t.tokenizer or hub.names_checkpoint(t.pretrained), 'model.text_encoder.tokenizer',
           t.tokenizer, f'text_encoder.pretrained={t.pretrained!r} holds no tokenizer either: '
           "set the tokenizer to a folder, a hub id ('bert-base-uncased') or 'package:<module>'")


def check_data_and_loss(config):
  d, l = config.data, config.loss
  _require(d.dataset in refer.DATASETS, 'data.dataset', d.dataset,
           f'must be one of {sorted(refer.DATASETS)}')
  _require(d.sentences in SENTENCES, 'data.sentences', d.sentences, f'must be one of {SENTENCES}')
  _require(d.refs_per_image >= 1, 'data.refs_per_image', d.refs_per_image, 'must be >= 1')
  _require(d.refs_per_image == 1 or d.sentences == 'random', 'data.refs_per_image',
           d.refs_per_image, "draws one sentence per ref: it needs data.sentences='random'")
  for key in ('num_workers', 'prefetch', 'read_threads', 'read_buffer_size'):
    _require(d[key] >= 0, f'data.{key}', d[key], 'must be >= 0')
  _require(d.eval_max_size >= 1, 'data.eval_max_size', d.eval_max_size, 'must be >= 1')
  _require(d.synthetic_images >= 1, 'data.synthetic_images', d.synthetic_images, 'must be >= 1')
  _require(l.name in losses.LOSSES, 'loss.name', l.name, f'must be one of {losses.LOSSES}')
  _require(len(l.class_weights) == 2 and min(l.class_weights) >= 0 and sum(l.class_weights) > 0,
           'loss.class_weights', tuple(l.class_weights),
           'must be two weights (background, object) >= 0, not both 0')
  _require(l.bce_weight >= 0 and l.dice_weight >= 0 and l.bce_weight + l.dice_weight > 0,
           'loss.bce_weight / loss.dice_weight', (l.bce_weight, l.dice_weight),
           'must be >= 0, not both 0')
  _require(l.target_resize in TARGET_RESIZES, 'loss.target_resize', l.target_resize,
           f'must be one of {TARGET_RESIZES}')


def _text_layers(t):
  """BERT's layer count: that of the checkpoint's config.json when it is on this machine (the
  model takes it from there, weights.with_checkpoint_text_sizes), else the config's."""
  if hub.names_checkpoint(t.pretrained):
    try:
      return bert_weights.read_config(
          hub.resolve_folder(t.pretrained, download=False))['num_hidden_layers']
    except hub.NotCachedError:
      pass
  return t.num_hidden_layers


def check_optim(config):
  o = config.optim
  _require(o.name in optim.OPTIMIZERS, 'optim.name', o.name, f'must be one of {optim.OPTIMIZERS}')
  _require(o.learning_rate > 0, 'optim.learning_rate', o.learning_rate, 'must be > 0')
  for key in ('end_learning_rate', 'decay_power', 'warmup_steps', 'weight_decay',
              'grad_clip_norm'):
    _require(o[key] >= 0, f'optim.{key}', o[key], 'must be >= 0')
  for key in ('b1', 'b2'):
    _require(0 <= o[key] < 1, f'optim.{key}', o[key], 'must lie in [0, 1)')
  _require(o.weight_decay_exempt in optim.WEIGHT_DECAY_EXEMPT, 'optim.weight_decay_exempt',
           o.weight_decay_exempt, f'must be one of {optim.WEIGHT_DECAY_EXEMPT}')
  for entry in o.lr_multipliers:
    ok = len(entry) == 2 and isinstance(entry[1], (int, float)) and entry[1] >= 0
    _require(ok, 'optim.lr_multipliers', entry, 'each entry is (regex, factor >= 0)')
    try:
      re.compile(entry[0])
    except (re.error, TypeError) as e:
      raise ValueError(f'optim.lr_multipliers: {entry[0]!r} is not a regex ({e})') from None
  layers = _text_layers(config.model.text_encoder)
  n = o.text_encoder_trainable_layers
  _require(-1 <= n <= layers, 'optim.text_encoder_trainable_layers', n,
           f'must be -1 (all of BERT) or 0..{layers} (the first N of its {layers} layers)')


def check_train(config):
  run_sizes.check(config)   # batch, accumulation and step counts
  tr = config.train
  for key in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'eval_batch_size'):
    _require(tr[key] >= 1, f'train.{key}', tr[key], 'must be >= 1')
  for key in ('eval_every_steps', 'num_eval_images'):
    _require(tr[key] >= 0, f'train.{key}', tr[key], 'must be >= 0 (0: none)')


def check_rest(config):
  """eval, mesh and pretrain."""
  metrics.check_protocol(config.eval.protocol)
  _require(0 < config.eval.collapse_qiou <= 1, 'eval.collapse_qiou', config.eval.collapse_qiou,
           'must lie in (0, 1]')
  mesh = config.mesh
  _require(mesh.data == -1 or mesh.data >= 1, 'mesh.data', mesh.data, 'must be -1 or >= 1')
  _require(mesh.fsdp >= 1, 'mesh.fsdp', mesh.fsdp, 'must be >= 1')
  _require(mesh.param_sharding in sharding.PARAM_SHARDINGS, 'mesh.param_sharding',
           mesh.param_sharding, f'must be one of {sharding.PARAM_SHARDINGS}')
  pt = config.pretrain
  _require(pt.vision_steps >= 0, 'pretrain.vision_steps', pt.vision_steps, 'must be >= 0')
  if pt.vision_steps > 0:
    _require(config.data.dataset == 'synthetic' and not config.data.data_dir,
             'pretrain.vision_steps', pt.vision_steps,
             "pretrains on the synthetic data the command generates: it needs "
             "data.dataset='synthetic' and data.data_dir='' (set it to 0 otherwise)")
    _require(pt.batch_size >= 1, 'pretrain.batch_size', pt.batch_size, 'must be >= 1')
    _require(pt.learning_rate > 0, 'pretrain.learning_rate', pt.learning_rate, 'must be > 0')
    _require(0 <= pt.warmup_steps < pt.vision_steps, 'pretrain.warmup_steps', pt.warmup_steps,
             f'must lie in [0, pretrain.vision_steps={pt.vision_steps})')
    spec = config.model.vision_encoder.pretrained
    _require(not hub.names_checkpoint(spec), 'model.vision_encoder.pretrained', spec,
             f'pretrain.vision_steps={pt.vision_steps} makes the vision encoder and loads it in '
             "place of this checkpoint: leave it '' or 'scratch', or set pretrain.vision_steps=0")


def check_pretrained(config):
  """Training: each encoder starts from a checkpoint, or from random weights because the config
  says `pretrained='scratch'`. '' (not set) is refused, naming the key and how to set it."""
  m = config.model
  if m.name == 'lavt' and m.lavt.pretrained:
    return   # a released LAVT checkpoint holds both encoders
  unset = []
  if not m.vision_encoder.pretrained and config.pretrain.vision_steps <= 0:
    unset.append("model.vision_encoder.pretrained is '' (Swin would start from random weights): "
                 'set it to a Swin checkpoint, e.g. '
                 '--config.model.vision_encoder.pretrained=/data/swin_base_patch4_window12_384_22k'
                 '.pth (official .pth; also a timm / HF safetensors file, folder or cached hub id, '
                 'or a folder made by python -m eavl_jax.convert)')
  if not m.text_encoder.pretrained:
    unset.append("model.text_encoder.pretrained is '' (BERT would start from random weights): "
                 "set it to a hub id ('bert-base-uncased'), a local folder with config.json and "
                 "weights, 'package:<python module>' or a folder made by "
                 'python -m eavl_jax.convert')
  if unset:
    raise ValueError('; '.join(unset) + f"; or to {hub.SCRATCH!r} to train from random weights on "
                     'purpose (docs/weights.md)')
  check_checkpoint_files(config)


def looks_like_a_path(spec):
  """A `pretrained` value that names a file or folder rather than a hub id or package."""
  return spec.startswith(('/', '.', '~')) or spec.endswith(('.pth', '.pt', '.bin', '.safetensors',
                                                            '.msgpack'))


def check_checkpoint_files(config):
  """Each checkpoint path of the config exists and starts as its format does (a few bytes read):
  a missing or wrong file is one line before the compile, not an error after it."""
  m = config.model
  files = {'model.vision_encoder.pretrained': m.vision_encoder.pretrained}
  if m.name == 'lavt':
    files['model.lavt.pretrained'] = m.lavt.pretrained
  for key, spec in files.items():
    if not hub.names_checkpoint(spec) or not (os.path.exists(spec) or looks_like_a_path(spec)):
      continue   # a hub id: resolved (and checked) where it is loaded
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
      raise ValueError(f'{key}={spec!r}: no such file or folder')
    if key == 'model.vision_encoder.pretrained':
      path = swin_weights.checkpoint_file(path)
    weight_files.check_header(path, key)


def validate(config, *, training=False):
  """Raises ValueError naming the first bad key of `config` (training: and unset encoders)."""
  check_model(config.model)
  check_data_and_loss(config)
  check_optim(config)
  check_train(config)
  check_rest(config)
  if training:
    check_pretrained(config)
