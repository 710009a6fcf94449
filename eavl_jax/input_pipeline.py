"""Input pipeline: grain over the `eavl_refer` TFDS ArrayRecord records (eavl_jax/data/refer_tfds.py).

Train batches (numpy, per host):
  image           float32 (B, S, S, 3)  ImageNet mean/std normalised, S = model.image_size
  input_ids       int32   (B, L)        L = model.max_tokens, [CLS] ... [SEP] [PAD]..., truncated
  attention_mask  int32   (B, L)
  mask            uint8   (B, S, S)     {0, 1}, nearest-resized
  ref_id          int32   (B,)
Eval batches add:
  mask_orig       uint8   (B, M, M)     original-size mask at the top left of a zero canvas,
                                        M = data.eval_max_size
  orig_size       int32   (B, 2)        (h, w)
  valid           bool    (B,)          False for the padding that fills the last batches
  sentence_index  int32   (B,)
  tokens_dropped  int32   (B,)          tokens the cut to L dropped from the expression (0: none)

Under eval.protocol='lavt' the eval batches are made as LAVT-RIS's test.py makes its inputs
(docs/evaluation.md): the whole JPEG decoded, PIL's bilinear resize to S x S, ToTensor's / 255
then Normalize's (x - mean) / std in float32, and LAVT's token rule (TOKEN_RULES).

Train: one random sentence per ref per epoch (data.sentences = 'random', LAVT) or every sentence a
sample ('all'); seeded shuffle, reshuffled every epoch, endless. With data.refs_per_image = K > 1
the samples are images instead: each epoch every train image once, with K of its refs drawn at
random (distinct; an image with fewer than K refs repeats some of them, drawn again at random), one
random sentence each. Then `image` is (B/K, S, S, 3) and every other key has B = (B/K) * K rows,
expressions b*K .. b*K+K-1 being about image b (the model's `refs_per_image`). The iterator is grain's
DataLoader iterator: `get_state()` / `set_state()`, and orbax saves it with
`grain.python.PyGrainCheckpointHandler` (grain 0.2.18). Eval: every sentence of every ref once,
padded to equal batch counts on all processes.
"""
import io
import math

from absl import flags
import grain
import numpy as np
from PIL import Image

from eavl_jax.data import refer_tfds
from eavl_jax import hub

MEAN_RGB = np.asarray([0.485, 0.456, 0.406], np.float32) * 255.0
STD_RGB = np.asarray([0.229, 0.224, 0.225], np.float32) * 255.0
_INV_STD = (1.0 / STD_RGB).astype(np.float32)
_MEAN_OVER_STD = (MEAN_RGB / STD_RGB).astype(np.float32)
# torchvision's Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]) on ToTensor's
# x / 255: the constants as float32 tensors (LAVT's test.py and train.py).
_TORCH_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
_TORCH_STD = np.asarray([0.229, 0.224, 0.225], np.float32)

# How a sentence becomes L = model.max_tokens ids (Tokenize):
TOKEN_RULES = {
    # the tokenizer's truncation: [CLS] ... [SEP] always kept, then [PAD] up to L.
    'keep_sep': '[CLS] words [SEP] truncated to L keeping [SEP], padded with [PAD]',
    # LAVT's ReferDataset: encode(add_special_tokens=True), cut at L (a long sentence loses its
    # [SEP]), then 0s up to L; the attention mask is 1 on the kept ids.
    'lavt': 'encode with [CLS] and [SEP], then cut at L (a long sentence loses [SEP]), '
            'padded with 0',
}
# How the eval images are made (decode_image):
IMAGE_RULES = {
    'draft': "PIL: JPEG DCT scaling while both sides stay >= S, bilinear to S x S; "
             "x * (1 / (255 std)) - mean / std in float32",
    'lavt': "PIL: the whole JPEG, bilinear to S x S (torchvision's resize of a PIL image); "
            "(x / 255 - mean) / std in float32 (ToTensor, Normalize)",
}


# ------------------------------------------------------------------ records


def _builder(config):
  if not config.data.data_dir:
    raise ValueError('config.data.data_dir is empty: set it to the TFDS data_dir that '
                     'python -m data_prep.build wrote into')
  builder = refer_tfds.EavlRefer(config=config.data.dataset, data_dir=config.data.data_dir)
  if not builder.is_prepared():
    raise ValueError(f'no eavl_refer/{config.data.dataset} records under data_dir='
                     f'{config.data.data_dir!r}: build them with python -m data_prep.build '
                     f'--dataset={config.data.dataset} --data_dir={config.data.data_dir} ...')
  return builder


def _records(config, split):
  """(records of `split`: _Records over its TFDS data source, sentence count per record)."""
  builder = _builder(config)
  counts = builder.info.metadata['sentences_per_ref']
  if split not in counts:
    raise ValueError(f'{config.data.dataset} has no split {split!r}; splits: {sorted(counts)}')
  info = builder.info.splits[split]
  records = _Records(config, split, builder.as_data_source(split), info.filepaths,
                     info.shard_lengths)
  sentences = np.asarray(counts[split], np.int64)
  if len(records) != len(sentences):
    raise ValueError(f'{builder.data_dir}: {len(records)} records in {split} but metadata lists '
                     f'{len(sentences)}: rebuild the data set')
  if (builder.data_dir, split) not in _READABLE_SHARDS:
    records.check_shards()
    _READABLE_SHARDS.add((builder.data_dir, split))
  return records, sentences


_READABLE_SHARDS = set()   # (data_dir, split) whose shards opened once in this process


class _Records:
  """Record i of a split; a record that cannot be read is a ValueError naming the split, its shard
  file and how to rebuild it (instead of Riegeli's RuntimeError naming no file)."""

  def __init__(self, config, split, source, paths, lengths):
    self._source, self._split, self._paths = source, split, list(paths)
    self._lengths = np.asarray(lengths, np.int64)
    self._ends = np.cumsum(self._lengths)        # the index after each shard's last record
    self._rebuild = (f'python -m data_prep.build --dataset={config.data.dataset} '
                     f'--data_dir={config.data.data_dir} --overwrite ...')

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    try:
      return self._source[i]
    except Exception as e:  # pylint: disable=broad-exception-caught  (Riegeli's RuntimeError, ...)
      path = self._paths[int(np.searchsorted(self._ends, int(i), side='right'))]
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(f'split {self._split!r}: the record file {path} cannot be read '
                       f'({reason[:200]}): it is damaged or cut short; rebuild the records with '
                       f'{self._rebuild}') from None

  def check_shards(self):
    """Reads the first record of every shard: a file cut short (its index is at its end) fails
    here, in seconds, not after the compile."""
    for start, length in zip(self._ends - self._lengths, self._lengths):
      if length:
        self[int(start)]


def num_examples(config, split: str) -> int:
  """Expressions per epoch of `split`: for training one per ref (data.sentences='random'), K per
  image (data.refs_per_image=K > 1) or every sentence ('all'); for evaluation every sentence."""
  if split == config.data.train_split:
    if config.data.refs_per_image > 1:
      return len(_image_groups(config, split)) * config.data.refs_per_image
    if config.data.sentences == 'random':
      return len(_records(config, split)[1])
  return num_eval_examples(config, split)


def num_eval_examples(config, split: str) -> int:
  """Expressions an evaluation of `split` sees (make_eval_loader): every sentence, the training
  split's too."""
  _, sentences = _records(config, split)
  return int(sentences.sum())


def _image_groups(config, split):
  """[record indices of one image's refs] for every image of `split`, in first-record order."""
  builder = _builder(config)
  image_ids = builder.info.metadata.get('image_ids')
  if image_ids is None or split not in image_ids:
    raise ValueError(f'{builder.data_dir}: the records have no image_ids metadata (built before '
                     f'data.refs_per_image existed): rebuild them with python -m data_prep.build, '
                     f'or set data.refs_per_image=1')
  groups = {}
  for index, image_id in enumerate(image_ids[split]):
    groups.setdefault(int(image_id), []).append(index)
  return list(groups.values())


class _RefSource:
  """Record i -> (record, -1): the sentence is drawn later."""

  def __init__(self, records, name):
    self._records, self._name = records, name

  def __len__(self):
    return len(self._records)

  def __repr__(self):      # grain checks it when a saved iterator state is restored
    return f'_RefSource({self._name}, {len(self)} refs)'

  def __getitem__(self, i):
    return self._records[int(i)], -1


class _SentenceSource:
  """Sample i -> (record, sentence index) over (ref, sentence) pairs; None past `items`' end.

  items: (N, 2) int array of (record index, sentence index); length: N plus padding.
  """

  def __init__(self, records, name, items, length=None):
    self._records, self._name, self._items = records, name, items
    self._length = len(items) if length is None else length

  def __len__(self):
    return self._length

  def __repr__(self):      # grain checks it when a saved iterator state is restored
    return f'_SentenceSource({self._name}, {len(self._items)} sentences, length {self._length})'

  def __getitem__(self, i):
    i = int(i)
    if i >= len(self._items):
      return None
    r, j = self._items[i]
    return self._records[int(r)], int(j)


class _ImageSource:
  """Image i -> [its refs' records]."""

  def __init__(self, records, name, groups):
    self._records, self._name, self._groups = records, name, groups

  def __len__(self):
    return len(self._groups)

  def __repr__(self):      # grain checks it when a saved iterator state is restored
    return f'_ImageSource({self._name}, {len(self)} images)'

  def __getitem__(self, i):
    return [self._records[r] for r in self._groups[int(i)]]


def _sentence_items(sentences):
  """(sum(sentences), 2): (record index, sentence index) for every sentence, record-major."""
  refs = np.repeat(np.arange(len(sentences)), sentences)
  starts = np.repeat(np.cumsum(sentences) - sentences, sentences)
  return np.stack([refs, np.arange(len(refs)) - starts], axis=1)


# ------------------------------------------------------------------ per-sample processing


def decode_image(jpeg: bytes, size: int, rule: str = 'draft') -> np.ndarray:
  """JPEG bytes -> (size, size, 3) float32, bilinear resize, ImageNet mean/std normalised, by
  IMAGE_RULES[rule]: 'draft' (the project's, fast) or 'lavt' (LAVT's test.py, to the bit)."""
  if rule not in IMAGE_RULES:
    raise ValueError(f'image rule {rule!r}: expected one of {sorted(IMAGE_RULES)}')
  with Image.open(io.BytesIO(jpeg)) as im:
    if rule == 'draft':
      im.draft('RGB', (size, size))    # JPEG DCT scaling, only while both sides stay >= size
    im = im.convert('RGB')
    if im.size != (size, size):
      im = im.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(im)                                          # (S, S, 3) uint8
  if rule == 'lavt':
    return (pixels.astype(np.float32) / np.float32(255) - _TORCH_MEAN) / _TORCH_STD
  image = np.multiply(pixels, _INV_STD, dtype=np.float32)            # (x - mean) / std
  image -= _MEAN_OVER_STD
  return image


def decode_mask(png: bytes, size: int | None = None) -> np.ndarray:
  """PNG bytes -> (H, W) uint8 {0, 1}, or (size, size) nearest-resized."""
  with Image.open(io.BytesIO(png)) as im:
    im = im.convert('L')
    if size is not None and im.size != (size, size):
      im = im.resize((size, size), Image.NEAREST)
    return (np.asarray(im) > 0).astype(np.uint8)


_TOKENIZERS = {}      # per process: (tokenizer, pretrained) -> tokenizer


class Tokenize:
  """Text -> (input_ids, attention_mask) int32 (L,) by TOKEN_RULES[rule]: 'keep_sep' (truncated
  to L keeping [SEP]: training, evaluation and `python -m eavl_jax.predict`), or 'lavt' (LAVT's
  ReferDataset: evaluation under eval.protocol='lavt')."""

  # A data set has a fixed set of sentences, each seen once per epoch: the ids of each are kept
  # (read-only arrays) after its first call, since the HF call costs ~1.4 ms a sentence, a fifth
  # of an in-process train batch of the embedded default (benchmarks/train_loader.py).
  CACHE_SIZE = 1 << 18

  def __init__(self, text_config, max_tokens, rule='keep_sep'):
    if rule not in TOKEN_RULES:
      raise ValueError(f'token rule {rule!r}: expected one of {sorted(TOKEN_RULES)}')
    self._text_config, self._max_tokens, self._rule = text_config, max_tokens, rule
    self._tokenizer = None
    self._cache = {}

  def __getstate__(self):      # loaded again in each worker process
    return {**self.__dict__, '_tokenizer': None, '_cache': {}}

  def _load(self):
    if self._tokenizer is None:
      key = (self._text_config.tokenizer, self._text_config.pretrained)
      if key not in _TOKENIZERS:
        _TOKENIZERS[key] = hub.load_tokenizer(self._text_config)
      self._tokenizer = _TOKENIZERS[key]
    return self._tokenizer

  def dropped(self, text: str) -> int:
    """How many tokens of `text` ([CLS] and [SEP] counted) the cut to max_tokens drops. A text
    whose ids leave padding was not cut: only a full row is encoded again, uncut."""
    _, attention_mask = self(text)
    if attention_mask[-1] == 0:
      return 0
    return max(0, len(self._load().encode(text, add_special_tokens=True)) - self._max_tokens)

  def __call__(self, text: str):
    cached = self._cache.get(text)
    if cached is not None:
      return cached
    self._load()
    if self._rule == 'lavt':
      ids = lavt_token_ids(self._tokenizer, text, self._max_tokens)
    else:
      out = self._tokenizer(text, max_length=self._max_tokens, truncation=True,
                            padding='max_length', return_attention_mask=True)
      ids = (np.asarray(out['input_ids'], np.int32), np.asarray(out['attention_mask'], np.int32))
    for x in ids:
      x.flags.writeable = False
    if len(self._cache) < self.CACHE_SIZE:
      self._cache[text] = ids
    return ids


def lavt_token_ids(tokenizer, text, max_tokens):
  """LAVT's rule (data/dataset_refer_bert.py) -> (input_ids, attention_mask) int32 (L,):
  encode with [CLS] and [SEP], keep the first L ids (a long sentence loses [SEP]), 0 after."""
  kept = tokenizer.encode(text, add_special_tokens=True)[:max_tokens]
  input_ids = np.zeros((max_tokens,), np.int32)
  attention_mask = np.zeros((max_tokens,), np.int32)
  input_ids[:len(kept)] = kept
  attention_mask[:len(kept)] = 1
  return input_ids, attention_mask


def _sentence(record, j):
  text = record['sentences'][j]
  text = text.decode('utf-8') if isinstance(text, bytes) else str(text)
  if not text.strip():
    raise ValueError(f'ref_id={int(record["ref_id"])} sentence {j}: empty expression')
  return text


class _TrainSample(grain.transforms.RandomMap):
  """(record, sentence index or -1) -> train sample; -1 draws one sentence with grain's rng."""

  def __init__(self, image_size, tokenize):
    self._size, self._tokenize = image_size, tokenize

  def random_map(self, element, rng: np.random.Generator):
    record, j = element
    if j < 0:
      j = int(rng.integers(len(record['sentences'])))
    input_ids, attention_mask = self._tokenize(_sentence(record, j))
    return {
        'image': decode_image(record['image'], self._size),          # (S, S, 3)
        'input_ids': input_ids,                                      # (L,)
        'attention_mask': attention_mask,                            # (L,)
        'mask': decode_mask(record['mask'], self._size),             # (S, S)
        'ref_id': np.int32(record['ref_id']),
    }


class _ImageSample(grain.transforms.RandomMap):
  """[records of one image] -> K refs of it: image (S,S,3), input_ids (K,L), mask (K,S,S), ..."""

  def __init__(self, image_size, tokenize, refs_per_image):
    self._size, self._tokenize, self._k = image_size, tokenize, refs_per_image

  def random_map(self, records, rng: np.random.Generator):
    k = self._k
    chosen = list(rng.permutation(len(records))[:k])
    chosen += list(rng.integers(len(records), size=k - len(chosen)))   # fewer than K refs
    texts, masks = [], []
    for r in chosen:
      record = records[r]
      texts.append(self._tokenize(_sentence(record, int(rng.integers(len(record['sentences']))))))
      masks.append(decode_mask(record['mask'], self._size))
    return {
        'image': decode_image(records[0]['image'], self._size),      # (S, S, 3), once
        'input_ids': np.stack([t[0] for t in texts]),                # (K, L)
        'attention_mask': np.stack([t[1] for t in texts]),           # (K, L)
        'mask': np.stack(masks),                                     # (K, S, S)
        'ref_id': np.asarray([records[r]['ref_id'] for r in chosen], np.int32),  # (K,)
    }


class _FlattenRefs(grain.transforms.Map):
  """(B/K, K, ...) -> (B, ...) for every key but the image."""

  def map(self, element):
    return {k: v if k == 'image' else v.reshape((-1,) + v.shape[2:]) for k, v in element.items()}


class _EvalSample(grain.transforms.Map):
  """(record, sentence index) or None (padding) -> eval sample; image_rule: IMAGE_RULES'."""

  def __init__(self, image_size, max_size, tokenize, image_rule='draft'):
    self._size, self._max_size, self._tokenize = image_size, max_size, tokenize
    self._image_rule = image_rule

  def map(self, element):
    s, m = self._size, self._max_size
    mask_orig = np.zeros((m, m), np.uint8)                           # (M, M)
    if element is None:
      input_ids, attention_mask = self._tokenize('')
      return {'image': np.zeros((s, s, 3), np.float32), 'input_ids': input_ids,
              'attention_mask': attention_mask, 'mask': np.zeros((s, s), np.uint8),
              'mask_orig': mask_orig, 'orig_size': np.zeros((2,), np.int32),
              'valid': np.bool_(False), 'ref_id': np.int32(-1), 'sentence_index': np.int32(-1),
              'tokens_dropped': np.int32(0)}
    record, j = element
    full = decode_mask(record['mask'])                               # (h, w)
    h, w = full.shape
    if h > m or w > m:
      raise ValueError(f'ref_id={int(record["ref_id"])}: image {h}x{w} is larger than '
                       f'config.data.eval_max_size={m}; raise it')
    mask_orig[:h, :w] = full
    text = _sentence(record, j)
    input_ids, attention_mask = self._tokenize(text)
    return {
        'image': decode_image(record['image'], s, self._image_rule),
        'input_ids': input_ids,
        'attention_mask': attention_mask,
        'mask': np.asarray(Image.fromarray(full).resize((s, s), Image.NEAREST)),
        'mask_orig': mask_orig,
        'orig_size': np.asarray([h, w], np.int32),
        'valid': np.bool_(True),
        'ref_id': np.int32(record['ref_id']),
        'sentence_index': np.int32(j),
        'tokens_dropped': np.int32(self._tokenize.dropped(text)),   # cut to max_tokens
    }


# ------------------------------------------------------------------ loaders


def _data_loader(config, source, sampler, operations):
  if config.data.num_workers > 0 and not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside absl.app (tests, notebooks) use defaults.
    flags.FLAGS.mark_as_parsed()
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=config.data.num_workers,
                          worker_buffer_size=max(1, config.data.prefetch),
                          read_options=grain.ReadOptions(
                              num_threads=config.data.read_threads,
                              prefetch_buffer_size=config.data.read_buffer_size))


def _tokenize(config, rule='keep_sep'):
  return Tokenize(config.model.text_encoder, config.model.max_tokens, rule)


# eval.protocol -> (token rule, image rule) of the eval batches.
EVAL_RULES = {'original': ('keep_sep', 'draft'), 'lavt': ('lavt', 'lavt')}


def eval_rules(config):
  """(TOKEN_RULES key, IMAGE_RULES key) of the eval batches under config.eval.protocol."""
  if config.eval.protocol not in EVAL_RULES:
    raise ValueError(f'eval.protocol={config.eval.protocol!r}: expected one of '
                     f'{sorted(EVAL_RULES)}')
  return EVAL_RULES[config.eval.protocol]


def records_metadata(config):
  """What the records were built with that changes the pixels: {'resize_to' (0: the JPEG as is),
  'mask_rule'} (data_prep.build; absent from older builds: 0 and 'union')."""
  metadata = _builder(config).info.metadata
  return {'resize_to': int(metadata.get('resize_to', 0)),
          'mask_rule': str(metadata.get('mask_rule', 'union'))}


def make_train_loader(config, *, seed: int, shard_index: int, shard_count: int, batch_size: int):
  """Endless iterator of train batches from this process's shard (get_state / set_state)."""
  records, sentences = _records(config, config.data.train_split)
  name = f'{config.data.dataset}/{config.data.train_split}'
  k = config.data.refs_per_image
  if k < 1:
    raise ValueError(f'config.data.refs_per_image={k}: must be at least 1')
  if k > 1:
    source, operations, rows, unit = _image_samples(config, records, name, batch_size)
  elif config.data.sentences in ('random', 'all'):
    source = (_RefSource(records, name) if config.data.sentences == 'random' else
              _SentenceSource(records, name, _sentence_items(sentences)))
    operations = [_TrainSample(config.model.image_size, _tokenize(config)),
                  grain.transforms.Batch(batch_size, drop_remainder=True)]
    rows, unit = batch_size, 'samples'
  else:
    raise ValueError(f"config.data.sentences={config.data.sentences!r}: expected 'random' or 'all'")
  if len(source) < shard_count * rows:
    raise ValueError(f'{config.data.dataset} {config.data.train_split}: {len(source)} {unit}, '
                     f'fewer than {shard_count} process(es) x {rows} {unit} per batch')
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=False),
      shuffle=True, num_epochs=None, seed=seed)
  return iter(_data_loader(config, source, sampler, operations))


def _image_samples(config, records, name, batch_size):
  """data.refs_per_image = K > 1: (source of images, operations, images per batch, 'images')."""
  k = config.data.refs_per_image
  if config.data.sentences != 'random':
    raise ValueError(f'config.data.refs_per_image={k} draws one random sentence per ref: it needs '
                     f"config.data.sentences='random', not {config.data.sentences!r}")
  if batch_size % k:
    raise ValueError(f'config.data.refs_per_image={k} does not divide the per-process batch of '
                     f'{batch_size} expressions (train.global_batch_size)')
  source = _ImageSource(records, name, _image_groups(config, config.data.train_split))
  operations = [_ImageSample(config.model.image_size, _tokenize(config), k),
                grain.transforms.Batch(batch_size // k, drop_remainder=True),
                _FlattenRefs()]
  return source, operations, batch_size // k, 'images'


def make_eval_loader(config, split: str, *, shard_index: int, shard_count: int, batch_size: int):
  """Finite iterator over every sentence of `split`, this process's contiguous share of them.

  Every process yields ceil(ceil(N / shard_count) / batch_size) batches; samples past its share
  are padding with valid=False.
  """
  records, sentences = _records(config, split)
  items = _sentence_items(sentences)
  n = len(items)
  start, end = n * shard_index // shard_count, n * (shard_index + 1) // shard_count
  num_batches = math.ceil(math.ceil(n / shard_count) / batch_size)
  source = _SentenceSource(records, f'{config.data.dataset}/{split}[{start}:{end}]',
                           items[start:end], length=num_batches * batch_size)
  sampler = grain.samplers.IndexSampler(num_records=len(source), shuffle=False, num_epochs=1)
  token_rule, image_rule = eval_rules(config)
  loader = _data_loader(config, source, sampler, [
      _EvalSample(config.model.image_size, config.data.eval_max_size,
                  _tokenize(config, token_rule), image_rule),
      grain.transforms.Batch(batch_size, drop_remainder=False)])
  return iter(loader)
