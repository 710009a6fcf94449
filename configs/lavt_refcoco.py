"""LAVT on RefCOCO (UNC splits) with LAVT's settings (docs/lavt.md): Swin-B (window 12, the
ImageNet-22k 384² release) and BERT-base, 480² input, 20 tokens, AdamW (lr 5e-5, weight decay
0.01 but on the image encoder's norms and position tables), polynomial decay (power 0.9) over 40
epochs, batch 32, BERT's first 10 layers trained, one random sentence per ref and epoch, and its
loss: 2-class cross-entropy with class weights 0.9 / 1.1 at the input size.

  python -m eavl_jax.train --config=configs/lavt_refcoco.py --workdir=DIR \
      --config.model.vision_encoder.pretrained=/data/swin_base_patch4_window12_384_22k.pth
"""
from configs import refcoco


def get_config():
  c = refcoco.get_config()
  m = c.model
  m.name = 'lavt'
  m.lavt.head = 'fixed'
  m.image_size = 480
  m.max_tokens = 20
  m.vision_encoder.drop_path_rate = 0.3
  m.lavt.fusion_heads = (1, 1, 1, 1)
  m.lavt.fusion_dropout = 0.0

  c.data.sentences = 'random'
  c.data.refs_per_image = 1

  c.loss.name = 'weighted_ce'
  c.loss.class_weights = (0.9, 1.1)
  c.loss.at_input_size = True

  o = c.optim
  o.name = 'adamw'
  o.learning_rate = 5e-5
  o.end_learning_rate = 0.0
  o.decay_power = 0.9
  o.warmup_steps = 0
  o.weight_decay = 0.01
  o.grad_clip_norm = 0.0
  # LAVT's optimizer leaves BERT's embeddings and its last two layers out (they stay as loaded)
  # and exempts only the image encoder's norms and relative-position tables from weight decay.
  o.text_encoder_trainable_layers = 10
  o.weight_decay_exempt = 'lavt'

  c.train.global_batch_size = 32
  c.train.num_epochs = 40
  c.train.num_steps = -1
  return c
