"""What a trained model's vision encoder knows of the synthetic shapes: linear probes.

  python -m tools.synthetic_probe --config=configs/synthetic.py --workdir=DIR
      [--checkpoint=STEP | --checkpoint=init] [--images=1200] [--raw_dir=<workdir>/data/raw]

For every shape of the first --images images, the features of the S/8 and S/16 cells under its
centre (the LayerNormed Swin maps x2, x3 that the neck reads) are collected; a softmax regression
is fitted on 75% of the shapes and scored on the rest, once per attribute (kind, colour, size).
`--checkpoint=init` probes the freshly initialised model: the floor that training should lift.
Prints held-out accuracy beside the majority-class rate.

Then the multi-query generator's word attention A (eq. 9) on val expressions: its entropy over
the words over that of the uniform distribution (1.0: every word weighted alike) and the mean
total-variation distance between two queries' attentions (0.0: all N_q queries are the same
mix of words, the multi-query design has collapsed into one query).

Last, what the language code holds on its way to the head: the same probes, on val, test A and
test B expressions, from F_t (the text encoder's projected output, averaged over the words) and
from F_q (the queries of eq. 10, averaged), for each attribute the expression names (its target's
colour, kind, size; its superlative or position word; its relation). A word that F_t holds and
F_q does not is lost inside the query generator, and the head cannot use it.

Then the live units of every ReLU projection σ(XW) of the neck and the multi-query generator
(eq. 2-3, 6, 8-10): how many of its channels are positive at some position (padding words
included) of the first val expressions. A channel that is zero everywhere gets no gradient again:
the branch it belongs to has dropped out of the model (docs/experiments.md: the neck's S/32 branch).
docs/experiments.md holds runs.
"""
import json
import os
import pickle
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags
import optax
from PIL import Image

from eavl_jax.data import synthetic
from eavl_jax import checkpointing
from eavl_jax import errors
from eavl_jax import input_pipeline
from eavl_jax import synthetic_task
from eavl_jax.models import builder
from eavl_jax.models import layers

FLAGS = flags.FLAGS
LEVELS = {'S/8': 'vision_norm_2', 'S/16': 'vision_norm_3'}


def define_flags():
  """Command-line flags, defined only when run as a program (no clash with other modules')."""
  config_flags.DEFINE_config_file('config', 'configs/synthetic.py', 'Experiment config file.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Training workdir (with data/raw from training).')
  flags.DEFINE_string('checkpoint', None, "A step of --workdir (default the latest), or 'init'.")
  flags.DEFINE_integer('images', 1200, 'Images whose shapes are probed.')
  flags.DEFINE_string('raw_dir', None, 'The generated refer files; default <workdir>/data/raw.')


def probe_accuracy(features, labels, train_share=0.75, steps=500, l2=1e-3):
  """Softmax regression on standardised features: held-out accuracy, majority-class rate."""
  x = np.asarray(features, np.float32)
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  classes = sorted(set(labels))
  y = np.array([classes.index(v) for v in labels])
  n = int(train_share * len(y))
  w = (jnp.zeros((x.shape[1], len(classes))), jnp.zeros(len(classes)))

  def loss(w):
    logp = jax.nn.log_softmax(x[:n] @ w[0] + w[1])
    return -logp[jnp.arange(n), y[:n]].mean() + l2 * jnp.sum(w[0] ** 2)

  tx = optax.adam(1e-2)
  opt = tx.init(w)

  @jax.jit
  def step(w, opt):
    updates, opt = tx.update(jax.grad(loss)(w), opt)
    return optax.apply_updates(w, updates), opt

  for _ in range(steps):
    w, opt = step(w, opt)
  predicted = np.argmax(x[n:] @ np.asarray(w[0]) + np.asarray(w[1]), 1)
  return float((predicted == y[n:]).mean()), float(np.bincount(y).max() / len(y))


def shape_features(config, variables, raw_dir, num_images, batch_size=50):
  """-> ({level: (N, D)}, {attribute: [N values]}) for the shapes of the first images."""
  with open(os.path.join(raw_dir, 'synthetic', 'instances.json')) as f:
    instances = json.load(f)
  kinds = {c['id']: c['name'] for c in instances['categories']}
  shapes = {}
  for a in instances['annotations']:
    shapes.setdefault(a['image_id'], []).append(a)
  images = [im for im in instances['images'] if im['id'] in shapes][:num_images]
  model = builder.build_model(config.model)
  s, length = config.model.image_size, config.model.max_tokens
  ids = np.zeros((1, length), np.int32)
  ids[0, :2] = (101, 102)                              # an empty expression: [CLS] [SEP]
  mask = (ids > 0).astype(np.int32)

  @jax.jit
  def maps(x):
    n = x.shape[0]
    _, state = model.apply(variables, x, np.repeat(ids, n, 0), np.repeat(mask, n, 0),
                           capture_intermediates=lambda m, _: m.name in LEVELS.values())
    return {k: state['intermediates'][v]['__call__'][0] for k, v in LEVELS.items()}

  features = {k: [] for k in LEVELS}
  attributes = {'kind': [], 'colour': [], 'size': []}
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    x = np.stack([(np.asarray(Image.open(os.path.join(raw_dir, 'images', im['file_name']))
                              .convert('RGB').resize((s, s), Image.BILINEAR), np.float32)
                   - input_pipeline.MEAN_RGB) / input_pipeline.STD_RGB for im in chunk])
    out = jax.device_get(maps(x))
    for b, im in enumerate(chunk):
      for a in shapes[im['id']]:
        cx, cy = a['center'][0] * s / im['width'], a['center'][1] * s / im['height']
        for level, m in out.items():
          cells = m.shape[1]
          features[level].append(m[b, min(int(cy * cells / s), cells - 1),
                                   min(int(cx * cells / s), cells - 1)])
        attributes['kind'].append(kinds[a['category_id']])
        attributes['colour'].append(a['colour'])
        attributes['size'].append(a['size'])
  return features, attributes


def attention_spread(attention, text_mask):
  """A (B, N_q, L), text_mask (B, L) -> (mean entropy / log(#words), mean total-variation
  distance between two queries' word distributions)."""
  a = np.asarray(attention, np.float64)
  words = np.asarray(text_mask).sum(1)                                   # (B,)
  entropy = -(a * np.log(np.where(a > 0, a, 1.0))).sum(-1)               # (B, N_q)
  relative = entropy / np.log(np.maximum(words, 2))[:, None]
  n_q = a.shape[1]
  if n_q < 2:
    return float(relative.mean()), 0.0
  pairs = [0.5 * np.abs(a[:, i] - a[:, j]).sum(-1) for i in range(n_q) for j in range(i + 1, n_q)]
  return float(relative.mean()), float(np.mean(pairs))


def word_attention(config, variables, split, max_batches=10):
  """-> (A (N, N_q, L), text masks (N, L)) of the model on `split`'s first batches."""
  model = builder.build_model(config.model)

  @jax.jit
  def attention(image, input_ids, text_mask):
    _, state = model.apply(variables, image, input_ids, text_mask,
                           mutable=['intermediates'])
    return state['intermediates']['query_generator']['word_attention'][0]

  loader = input_pipeline.make_eval_loader(config, split, shard_index=0, shard_count=1,
                                           batch_size=config.train.eval_batch_size)
  out, masks = [], []
  for i, batch in enumerate(loader):
    if i == max_batches:
      break
    keep = np.asarray(batch['valid'], bool)
    a = jax.device_get(attention(batch['image'], batch['input_ids'], batch['attention_mask']))
    out.append(a[keep])
    masks.append(np.asarray(batch['attention_mask'])[keep])
  return np.concatenate(out), np.concatenate(masks)


def positive_channels(activations):
  """Post-ReLU activations (..., C) -> (C,) bool: the channel is positive somewhere."""
  a = np.asarray(activations)
  return (a.reshape(-1, a.shape[-1]) > 0).any(0)


def live_units(config, variables, split, max_batches=3):
  """-> {module path: (live channels, channels)} of every ReLU projection, on `split`."""
  model = builder.build_model(config.model)

  @jax.jit
  def projections(image, input_ids, text_mask):
    _, state = model.apply(variables, image, input_ids, text_mask,
                           capture_intermediates=lambda m, _: isinstance(m, layers.ProjectReLU),
                           mutable=['intermediates'])
    return state['intermediates']

  loader = input_pipeline.make_eval_loader(config, split, shard_index=0, shard_count=1,
                                           batch_size=config.train.eval_batch_size)
  alive = {}
  for i, batch in enumerate(loader):
    if i == max_batches:
      break
    keep = np.asarray(batch['valid'], bool)
    out = jax.device_get(projections(batch['image'], batch['input_ids'], batch['attention_mask']))
    for path, value in jax.tree_util.tree_flatten_with_path(out)[0]:
      if len(path) < 2 or getattr(path[-2], 'key', None) != '__call__':
        continue                                          # sown diagnostics, not a projection
      name = '/'.join(str(p.key) for p in path[:-2])     # drop '__call__' and the output index
      positive = positive_channels(value[keep])
      alive[name] = alive.get(name, np.zeros_like(positive)) | positive
  return {name: (int(a.sum()), a.size) for name, a in alive.items()}


def expression_labels(text):
  """The attributes an expression of the synthetic grammar names ('none' where it names none)."""
  e = synthetic.parse(text)
  return {'colour': e.target.colour or 'none', 'kind': e.target.kind or 'none',
          'size': e.target.size or 'none', 'extreme': e.extreme or 'none',
          'relation': e.relation or 'none'}


def text_code(config, variables, raw_dir, splits):
  """-> ({'F_t': (N, C), 'F_q': (N, C)}, {attribute: [N labels]}), every expression of `splits`."""
  model = builder.build_model(config.model)
  with open(os.path.join(raw_dir, 'synthetic', 'refs(unc).p'), 'rb') as f:
    texts = {r['ref_id']: [t['sent'] for t in r['sentences']] for r in pickle.load(f)}

  @jax.jit
  def codes(image, input_ids, text_mask):
    _, state = model.apply(
        variables, image, input_ids, text_mask,
        capture_intermediates=lambda m, _: m.name in ('text_proj', 'query_generator'))
    f_t = state['intermediates']['text_proj']['__call__'][0]                      # (B, L, C)
    words = text_mask[..., None].astype(f_t.dtype)
    return {'F_t': (f_t * words).sum(1) / words.sum(1),
            'F_q': state['intermediates']['query_generator']['__call__'][0].mean(1)}  # (B, C)

  features, labels = {'F_t': [], 'F_q': []}, []
  for split in splits:
    loader = input_pipeline.make_eval_loader(config, split, shard_index=0, shard_count=1,
                                             batch_size=config.train.eval_batch_size)
    for batch in loader:
      keep = np.asarray(batch['valid'], bool)
      out = jax.device_get(codes(batch['image'], batch['input_ids'], batch['attention_mask']))
      for k, v in out.items():
        features[k].append(v[keep])
      labels += [expression_labels(texts[int(r)][int(j)])
                 for r, j in zip(batch['ref_id'][keep], batch['sentence_index'][keep])]
  attributes = {a: [l[a] for l in labels] for a in labels[0]}
  return {k: np.concatenate(v) for k, v in features.items()}, attributes


def main(argv):
  del argv
  if FLAGS.workdir is None:
    raise app.UsageError('--workdir is required')
  config = synthetic_task.prepare(FLAGS.config, FLAGS.workdir)
  if FLAGS.checkpoint == 'init':
    variables = builder.build_model(config.model).init(
        jax.random.PRNGKey(config.seed), *builder.dummy_inputs(config.model, 1))
  else:
    try:
      variables, _ = checkpointing.restore_variables(config, FLAGS.workdir, FLAGS.checkpoint)
    except (ValueError, FileNotFoundError) as e:     # no such step, another config: one line
      sys.exit(errors.error_message(e))
  raw = FLAGS.raw_dir or os.path.join(FLAGS.workdir, 'data', 'raw')
  features, attributes = shape_features(config, variables, raw, FLAGS.images)
  print(f'linear probes of the vision features at shape centres ({len(attributes["kind"])} '
        f'shapes, checkpoint {FLAGS.checkpoint or "latest"})')
  print(f'{"attribute":<10}{"level":<7}{"held-out acc":>13}{"majority":>10}')
  for name, values in attributes.items():
    for level, f in features.items():
      acc, majority = probe_accuracy(f, values)
      print(f'{name:<10}{level:<7}{acc:>13.3f}{majority:>10.3f}')
  attention, text_mask = word_attention(config, variables, config.data.val_split)
  entropy, distance = attention_spread(attention, text_mask)
  print(f'\nmulti-query generator, word attention A (eq. 9) on {len(attention)} '
        f'{config.data.val_split} expressions, {attention.shape[1]} queries')
  print(f'{"entropy / uniform":>18}{"distance between queries":>26}')
  print(f'{entropy:>18.3f}{distance:>26.3f}')
  splits = tuple(dict.fromkeys((config.data.val_split,) + tuple(config.data.eval_splits)))
  codes, named = text_code(config, variables, raw, splits)
  order = np.random.default_rng(0).permutation(len(named['kind']))    # splits mixed before 75/25
  print(f'\nlinear probes of the language code ({len(order)} expressions of {", ".join(splits)}): '
        f'the attribute the expression names')
  print(f'{"attribute":<10}{"F_t held-out":>14}{"F_q held-out":>14}{"majority":>10}')
  for name, values in named.items():
    values = [values[i] for i in order]
    (acc_t, majority), (acc_q, _) = (probe_accuracy(codes[k][order], values)
                                     for k in ('F_t', 'F_q'))
    print(f'{name:<10}{acc_t:>14.3f}{acc_q:>14.3f}{majority:>10.3f}')
  units = live_units(config, variables, config.data.val_split)
  print(f'\nlive units of the ReLU projections σ(XW) (channels positive somewhere on '
        f'{config.data.val_split})')
  print(f'{"projection":<34}{"live":>6}{"channels":>10}')
  for name, (live, total) in units.items():
    print(f'{name:<34}{live:>6}{total:>10}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
