"""An image encoder pretrained on the synthetic images, made inside the embedded default's command.

The paper starts from an ImageNet-22k Swin; the synthetic task has no such checkpoint to download,
so it makes its own stand-in: the Swin of `model.vision_encoder` learns, on the synthetic *train*
images only, what is at each cell of its stage 2, 3 and 4 maps: the shape's kind, colour and size,
or background (the generator's ground truth: each shape's mask and attributes in instances.json).
No expression and no val / test image is seen. The weights are written as a converted Swin folder
(swin.msgpack, with the stage-4 LayerNorm as its final norm) that `model.vision_encoder.pretrained`
loads like any other checkpoint.
"""
import json
import os
import pickle

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from eavl_jax.data import refer
from eavl_jax import input_pipeline
from eavl_jax.models import layers
from eavl_jax.models import swin
from eavl_jax.weights import files
from eavl_jax.weights import swin as swin_weights

ATTRIBUTES = ('kind', 'colour', 'size')
STAGES = (1, 2, 3)          # x2, x3, x4 of SwinTransformer's outputs: strides 8, 16, 32


def attribute_maps(raw_dir, image_size, split='train'):
  """-> images (N, S, S, 3) float32 normalised as in training, labels (N, S, S, 3) int32 (per pixel:
  kind, colour, size as 1-based class ids, 0 = background), {attribute: class names}."""
  ann_dir = os.path.join(raw_dir, 'synthetic')
  with open(os.path.join(ann_dir, 'instances.json')) as f:
    instances = json.load(f)
  with open(os.path.join(ann_dir, 'refs(unc).p'), 'rb') as f:
    image_ids = sorted({r['image_id'] for r in pickle.load(f) if r['split'] == split})
  anns = [a for a in instances['annotations']]
  names = {'kind': [c['name'] for c in sorted(instances['categories'], key=lambda c: c['id'])],
           'colour': sorted({a['colour'] for a in anns}), 'size': sorted({a['size'] for a in anns})}
  by_image = {}
  for a in anns:
    by_image.setdefault(a['image_id'], []).append(a)
  meta = {im['id']: im for im in instances['images']}
  images, labels = [], []
  for image_id in image_ids:
    im = meta[image_id]
    with open(os.path.join(raw_dir, 'images', im['file_name']), 'rb') as f:
      images.append(input_pipeline.decode_image(f.read(), image_size))
    label = np.zeros((im['height'], im['width'], 3), np.int32)
    for a in by_image.get(image_id, []):
      inside = refer.annotation_mask(a, im['height'], im['width']) > 0
      label[inside] = (a['category_id'], names['colour'].index(a['colour']) + 1,
                       names['size'].index(a['size']) + 1)
    rows = np.arange(image_size) * im['height'] // image_size
    cols = np.arange(image_size) * im['width'] // image_size
    labels.append(label[rows][:, cols])
  return np.stack(images), np.stack(labels), names


def cell_labels(labels, grid):
  """(N, S, S, 3) -> (N, grid, grid, 3): the label at each cell's centre pixel."""
  s = labels.shape[1]
  centres = (np.arange(grid) * s + s // 2) // grid
  return labels[:, centres][:, :, centres]


class AttributeNet(nn.Module):
  """The Swin of `model.vision_encoder` with a LayerNorm and a linear classifier per attribute on
  each stage used by EAVL."""
  vision: dict
  classes: tuple            # number of classes per attribute, background included

  @nn.compact
  def __call__(self, images, train=False):
    v = self.vision
    outs = swin.SwinTransformer(**swin.config_sizes(v), remat=False,
                                name='vision_encoder')(images, train=train)
    logits = {}
    for stage in STAGES:
      name = 'final_norm' if stage == 3 else f'norm_{stage}'
      x = nn.LayerNorm(name=name)(outs[stage])
      for attribute, n in zip(ATTRIBUTES, self.classes):
        logits[(stage, attribute)] = layers.Dense(n, name=f'{attribute}_{stage}')(x)
    return logits


def make_step(model, tx):
  def loss_fn(params, images, targets, rng):
    logits = model.apply({'params': params}, images, train=True, rngs={'dropout': rng})
    losses = [optax.softmax_cross_entropy_with_integer_labels(
        logits[(stage, a)], targets[stage][..., i]).mean()
              for stage in STAGES for i, a in enumerate(ATTRIBUTES)]
    return sum(losses) / len(losses)

  @jax.jit
  def step(params, opt_state, images, targets, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, targets, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def pretrain(config, raw_dir, out_dir):
  """Trains AttributeNet for `config.pretrain.vision_steps` steps; writes out_dir/swin.msgpack."""
  p, v = config.pretrain, config.model.vision_encoder
  images, labels, names = attribute_maps(raw_dir, config.model.image_size)
  classes = tuple(len(names[a]) + 1 for a in ATTRIBUTES)
  model = AttributeNet(dict(v), classes)
  params = jax.jit(model.init)(jax.random.PRNGKey(config.seed), images[:1])['params']
  schedule = optax.warmup_cosine_decay_schedule(0.0, p.learning_rate, p.warmup_steps,
                                                p.vision_steps)
  tx = optax.adamw(schedule, weight_decay=config.optim.weight_decay)
  opt_state = tx.init(params)
  step = make_step(model, tx)
  s = config.model.image_size
  targets = {stage: cell_labels(labels, s // (v.patch_size * 2 ** stage)) for stage in STAGES}
  rng = np.random.default_rng(config.seed)
  order, pos, loss = rng.permutation(len(images)), 0, None
  logging.info('pretraining the vision encoder on %d synthetic train images: %d steps of %d',
               len(images), p.vision_steps, p.batch_size)
  for i in range(p.vision_steps):
    if pos + p.batch_size > len(order):
      order, pos = rng.permutation(len(images)), 0
    idx = order[pos:pos + p.batch_size]
    pos += p.batch_size
    params, opt_state, loss = step(params, opt_state, images[idx],
                                   {k: t[idx] for k, t in targets.items()},
                                   jax.random.PRNGKey(i))
    if (i + 1) % 100 == 0:
      logging.info('vision pretraining step %d: loss %.4f', i + 1, float(loss))
  flat = traverse_util.flatten_dict(jax.device_get(params['vision_encoder']), sep='/')
  flat.update({f'{swin_weights.FINAL_NORM}/{k}': x for k, x in params['final_norm'].items()})
  files.write_msgpack(os.path.join(out_dir, swin_weights.CONVERTED_FILE), flat)
  return float(loss)
