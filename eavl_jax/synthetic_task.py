"""The synthetic task in a workdir: its images generated, their TFDS records built and (with
pretrain.vision_steps > 0) a Swin pretrained on them, each once, under <workdir>/data.

The commands call `prepare` before the training loop or an evaluation: with
data.dataset='synthetic' and no data.data_dir it returns the config pointed at those records
(data.data_dir, and the pretrained Swin's folder); any other config comes back unchanged.
"""
import json
import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections

from eavl_jax.data import build
from eavl_jax.data import synthetic
from eavl_jax import synthetic_pretrain


def prepare(config, workdir):
  """Synthetic data set with no data_dir: generate and build it under <workdir>/data once (and
  pretrain the vision encoder on it with pretrain.vision_steps > 0)."""
  if config.data.dataset != 'synthetic' or config.data.data_dir:
    return config
  root = os.path.join(workdir, 'data')
  data_dir = os.path.join(root, 'tfds')
  done = os.path.join(root, 'BUILT')   # holds what was generated: a changed config must not reuse it
  wanted = {'synthetic_images': config.data.synthetic_images, 'seed': config.seed,
            'metadata': 'image_ids'}   # records built before image_ids was kept differ
  if jax.process_index() == 0 and not os.path.exists(done):
    n = config.data.synthetic_images
    logging.info('generating %d synthetic images into %s', n, root)
    counts = synthetic.generate(os.path.join(root, 'raw'), n, config.seed)
    logging.info('synthetic refs per split: %s', counts)
    build.build('synthetic', os.path.join(root, 'raw'), os.path.join(root, 'raw', 'images'),
                data_dir, log=logging.info, overwrite=True)   # a build cut before `done`
    with open(done, 'w') as f:
      json.dump(wanted, f)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('synthetic data built')
  with open(done) as f:
    text = f.read()
  built = json.loads(text) if text.strip() else wanted   # an empty BUILT: written before this check
  if built != wanted:
    raise ValueError(f'{root} holds the synthetic data of {built}; this config asks for {wanted} '
                     '(data.synthetic_images, seed): use another --workdir, or delete that folder '
                     'to generate it again')
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.data_dir = data_dir
  if config.pretrain.vision_steps > 0:
    config.model.vision_encoder.pretrained = prepare_pretrained_vision(config, root)
  return config


def prepare_pretrained_vision(config, root):
  """config.pretrain.vision_steps > 0: the Swin pretrained on the synthetic train images under
  <root>/pretrained_vision (made once per pretraining config) -> that folder."""
  folder = os.path.join(root, 'pretrained_vision')
  done = os.path.join(folder, 'DONE')
  wanted = {'pretrain': config.pretrain.to_dict(), 'seed': config.seed,
            'vision_encoder': {k: v for k, v in config.model.vision_encoder.to_dict().items()
                               if k != 'pretrained'}, 'image_size': config.model.image_size}
  wanted = json.loads(json.dumps(wanted))     # tuples as lists, as read back
  if jax.process_index() == 0 and not os.path.exists(done):
    loss = synthetic_pretrain.pretrain(config, os.path.join(root, 'raw'), folder)
    with open(done, 'w') as f:
      json.dump({**wanted, 'final_loss': loss}, f)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('vision encoder pretrained')
  with open(done) as f:
    made = json.load(f)
  made.pop('final_loss', None)
  if made != wanted:
    raise ValueError(f'{folder} holds a vision encoder pretrained with {made}; this config asks '
                     f'for {wanted}: use another --workdir, or delete that folder')
  return folder
