"""The paper's setting (§IV-A; docs/design.md: the choices the paper leaves open, docs/synthetic.md
and docs/evaluation.md: their measurements); every config key is declared here, once.

The data-set files (refcoco.py, refcocop.py, ...) and tiny.py / synthetic.py only change values.
Override any key on the command line: `--config.model.num_queries=8`.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- model
  c.model = m = ml_collections.ConfigDict()
  m.name = 'eavl'             # 'eavl' | 'lavt' (LAVT, its head from model.lavt; docs/lavt.md)
  m.image_size = 480          # square input; W_vd (eq. 9) ties the model to this size
  m.max_tokens = 17           # counting [CLS] and [SEP]; 22 for G-Ref
  m.hidden_dim = 512          # C
  m.num_queries = 24          # N_q (table II)
  m.dtype = 'float32'         # compute dtype (float32 | bfloat16); parameters stay float32
  m.remat = False             # nn.remat around Swin and BERT blocks
  # Norm between each Dense / conv of the neck and query generator and its ReLU: 'none' (the
  # paper names none) | 'layer' (per sample) | 'batch' (per channel over the global batch, running
  # averages at evaluation, as CRIS's projections; measured in docs/synthetic.md).
  m.head_norm = 'none'
  # The global gates σ(F_tg W_tg) (eq. 2) and σ(F_vg W_vg) (eq. 8) start at 1 for every input
  # (zero weights, unit bias): the gated features start as the ungated ones (docs/synthetic.md).
  m.gates_open_at_init = False

  # Swin-B, window 12 (ImageNet-22k 384² release).
  m.vision_encoder = v = ml_collections.ConfigDict()
  v.embed_dim = 128
  v.depths = (2, 2, 18, 2)
  v.num_heads = (4, 8, 16, 32)
  v.window_size = 12
  v.patch_size = 4
  v.mlp_ratio = 4.0
  v.drop_path_rate = 0.3
  # A Swin checkpoint: official .pth, timm / HF safetensors (file, folder or cached hub id), or a
  # folder of `python -m eavl_jax.convert` (docs/weights.md); 'scratch': random weights on purpose.
  # '' (not set): training refuses to start.
  v.pretrained = ''
  v.pool_heads = 8            # attention pooling of eq. 1

  # BERT-base. With `pretrained` set, the sizes below are replaced by the checkpoint's config.json.
  m.text_encoder = t = ml_collections.ConfigDict()
  # Hub id, local folder, 'package:<python module>'; 'scratch': random weights on purpose (then
  # `tokenizer` must be set); '' (not set): training refuses to start.
  t.pretrained = 'bert-base-uncased'
  t.tokenizer = ''            # folder / hub id of the tokenizer; '' = same as `pretrained`
  t.vocab_size = 30522
  t.hidden_size = 768
  t.num_hidden_layers = 12
  t.num_attention_heads = 12
  t.intermediate_size = 3072
  t.max_position_embeddings = 512
  t.type_vocab_size = 2
  t.layer_norm_eps = 1e-12
  t.hidden_dropout_prob = 0.1
  t.attention_probs_dropout_prob = 0.1

  # Loading: fail on missing / unexpected / mis-shaped keys unless allowed here.
  m.allow_missing_keys = False
  m.allow_unexpected_keys = False

  m.neck = n = ml_collections.ConfigDict()
  n.use_global_text = True    # eq. 2 with F_tg (table IV); off: F_v4 alone

  m.query_generator = q = ml_collections.ConfigDict()
  q.use_global_vision = True  # eq. 8 with F_vg (table IV); off: F_t alone
  q.scale_word_attention = False  # eq. 9 logits / sqrt(C): a departure (the paper has no scale)
  q.normalize_word_attention = False  # LayerNorm on eq. 9's q and k: a departure (docs/synthetic.md)

  m.decoder = d = ml_collections.ConfigDict()
  d.num_layers = 3
  d.num_heads = 8
  d.mlp_dim = 2048
  d.dropout = 0.1
  d.pre_norm = False

  m.aligner = a = ml_collections.ConfigDict()
  a.mode = 'aligner'          # 'aligner' (dynamic kernels, eq. 11-14) | 'fixed' (one learned 3x3 kernel)
  a.use_estimator = True      # multi-query estimator (eq. 13); off: equal weights 1/N_q
  a.estimator_heads = 8
  a.kernel_activation = 'none'  # σ on F_pn (eq. 11): 'none' (linear, as CRIS) | 'relu' (the text)
  a.feature_activation = 'none'  # on F_p after its conv: 'none' (eq. 11) | 'relu' (a departure)
  a.conv_impl = 'auto'        # dynamic conv: 'vmap_conv' (reference) | 'shifted_matmul' | 'auto' (fastest on backend)

  # model.name='lavt' only (eavl_jax/models/lavt.py). Swin, BERT and, with head='aligner', the
  # query generator and aligner take their sizes from the keys above.
  m.lavt = lv = ml_collections.ConfigDict()
  lv.head = 'fixed'           # 'fixed': LAVT's 1x1 conv to 2 classes | 'aligner': eq. 11-14 (table V)
  lv.fusion_heads = (1, 1, 1, 1)  # heads of each stage's pixel-word attention (LAVT's --mha)
  lv.fusion_dropout = 0.0     # dropout in the pixel-word attention (LAVT's --fusion_drop)
  lv.pretrained = ''          # a released LAVT checkpoint (.pth), loaded whole at initialisation

  # ---------------------------------------------------------------- data
  c.data = dt = ml_collections.ConfigDict()
  dt.dataset = 'refcoco'      # refcoco | refcocop | refcocog_umd | refcocog_google | synthetic
  dt.data_dir = ''            # TFDS data_dir holding the built ArrayRecord records
  dt.train_split = 'train'
  dt.eval_splits = ('val', 'testA', 'testB')
  dt.val_split = 'val'        # evaluated during training
  dt.sentences = 'random'     # train: 'random' (one sentence per ref per epoch, LAVT) | 'all'
  dt.refs_per_image = 1       # train: K > 1 = batches of images with K of their refs each (the
                              # image encoder runs once per image); 1 = independent refs (LAVT)
  dt.num_workers = 4          # grain worker processes per host (0 = in-process)
  dt.prefetch = 2
  dt.read_threads = 16        # grain.ReadOptions: threads reading records (0 = in the loader's
  dt.read_buffer_size = 500   # thread), records read ahead; grain's defaults
  dt.eval_max_size = 640      # original-size masks are padded to this canvas for batched metrics
  # dataset='synthetic' with data_dir '': training generates this many images (seed = c.seed)
  # and builds their records under <workdir>/data once (eavl_jax/synthetic_task.py: prepare).
  dt.synthetic_images = 2000

  # ---------------------------------------------------------------- encoder pretraining
  # dataset='synthetic' only: > 0 pretrains the Swin on the synthetic train images (kind, colour,
  # size at each cell; eavl_jax/synthetic_pretrain.py) for this many steps before training, and
  # loads it as model.vision_encoder.pretrained. Made once under <workdir>/data.
  c.pretrain = pt = ml_collections.ConfigDict()
  pt.vision_steps = 0
  pt.batch_size = 32
  pt.learning_rate = 1e-3
  pt.warmup_steps = 50

  # ---------------------------------------------------------------- loss
  c.loss = ml_collections.ConfigDict()
  # 'bce': binary cross-entropy (bce_weight) + dice (dice_weight) | 'weighted_ce': LAVT's
  # 2-class cross-entropy, class_weights (background, object), normalised by the weights' sum
  c.loss.name = 'bce'
  c.loss.class_weights = (0.9, 1.1)
  c.loss.bce_weight = 1.0
  c.loss.dice_weight = 0.0
  # False: on the S/4 logits against the ground truth resized to them (as CRIS). True: on
  # the logits upsampled bilinearly to the input size, as evaluation upsamples them (LAVT).
  c.loss.at_input_size = False
  # How the ground truth is resized to the S/4 logits (at_input_size False): 'nearest' (the pixel
  # at each cell's centre) | 'area' (each cell's foreground share: soft targets).
  c.loss.target_resize = 'nearest'

  # ---------------------------------------------------------------- optimisation
  c.optim = o = ml_collections.ConfigDict()
  o.name = 'adamw'
  o.learning_rate = 5e-5
  o.end_learning_rate = 0.0
  o.decay_power = 0.9         # polynomial decay to 0 over the run
  o.warmup_steps = 0
  o.weight_decay = 0.01       # AdamW's, on all but `weight_decay_exempt`'s parameters
  # Parameters without weight decay (docs/training.md): 'lavt' (LAVT's optimizer groups: only the
  # image encoder's norms and relative-position tables) | 'norms_and_biases' (every norm, bias
  # and relative-position table).
  o.weight_decay_exempt = 'lavt'
  o.b1 = 0.9
  o.b2 = 0.999
  o.grad_clip_norm = 0.0      # 0 = off
  o.grad_accum_steps = 1
  # ((regex over the parameter path 'text_encoder/.*', lr factor), ...): first full match wins,
  # default 1; factor 0 freezes (no gradient is computed for it). Empty: one lr for everything.
  o.lr_multipliers = ()
  # BERT's encoder layers 0..N-1 train; its embeddings and layers N.. keep their loaded weights
  # (LAVT's optimizer: 10 of BERT-base's 12; docs/training.md). -1: all of BERT trains.
  o.text_encoder_trainable_layers = 10

  # ---------------------------------------------------------------- training loop
  c.train = tr = ml_collections.ConfigDict()
  tr.global_batch_size = 32
  tr.num_epochs = 40
  tr.num_steps = -1           # > 0 overrides num_epochs
  tr.log_every_steps = 50
  tr.eval_every_steps = 5000
  tr.checkpoint_every_steps = 2000
  tr.keep_checkpoints = 3
  # A latest step that cannot be read (docs/training.md): False stops with one line naming it and
  # the way out; True renames it to checkpoints/<step>.damaged, logs it, and resumes from the
  # newest step that reads. Nothing is deleted either way.
  tr.resume_past_damaged = False
  tr.eval_batch_size = 32
  tr.num_eval_images = 4      # prediction images written to TensorBoard at each evaluation
  # Memory per device the train step may use (checked on the compiled step before the first step,
  # eavl_jax/device_memory.py); 0 = the device's own limit (GPU, TPU; CPU: host memory / devices).
  tr.device_memory_bytes = 0

  # ---------------------------------------------------------------- evaluation
  # How validation and `python -m eavl_jax.evaluate` score a prediction (docs/evaluation.md):
  # 'original': the logits upsampled bilinearly (half-pixel centres) to each image's own size,
  # against its original mask | 'lavt': LAVT's test.py to the digit, for any model: its image
  # decoding and token rule for the eval batches, the logits upsampled with the corners aligned
  # to the model.image_size² input, against the mask resized there with nearest neighbour
  # (the paper's LAVT-based rows of table I used it).
  c.eval = ml_collections.ConfigDict()
  c.eval.protocol = 'original'
  # Validation warns (one line) when the query masks' mean pairwise IoU reaches this: the N_q
  # queries then draw nearly one mask (docs/training.md, "When the queries collapse").
  c.eval.collapse_qiou = 0.9

  # ---------------------------------------------------------------- devices
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1            # -1: every device not used by fsdp
  c.mesh.fsdp = 1
  c.mesh.param_sharding = 'replicate'  # 'replicate' | 'fsdp'
  return c
