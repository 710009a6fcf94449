"""The grain input pipeline over the built synthetic records (in-process, tiny config)."""
import collections
import copy
import math
import os
import pickle

import numpy as np
from PIL import Image
from pycocotools import coco as coco_api
import pytest

from configs import tiny
from eavl_jax import input_pipeline


@pytest.fixture(scope='module')
def config(synthetic_records):
  c = tiny.get_config()
  c.data.data_dir = synthetic_records
  c.data.num_workers = 0
  return c


@pytest.fixture(scope='module')
def source(synthetic_raw):
  with open(os.path.join(synthetic_raw, 'synthetic', 'refs(unc).p'), 'rb') as f:
    refs = pickle.load(f)
  return {r['ref_id']: r for r in refs}, coco_api.COCO(
      os.path.join(synthetic_raw, 'synthetic', 'instances.json'))


def _train(config, seed=0, shard_index=0, shard_count=1, batch_size=4):
  return input_pipeline.make_train_loader(config, seed=seed, shard_index=shard_index,
                                          shard_count=shard_count, batch_size=batch_size)


def _refs_in(split, refs):
  return sorted(r['ref_id'] for r in refs.values() if r['split'] == split)


def test_train_batch_shapes_dtypes_and_values(config, source):
  refs, coco = source
  batch = next(_train(config, batch_size=4))
  s, l = config.model.image_size, config.model.max_tokens
  expected = {'image': ((4, s, s, 3), np.float32), 'input_ids': ((4, l), np.int32),
              'attention_mask': ((4, l), np.int32), 'mask': ((4, s, s), np.uint8),
              'ref_id': ((4,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  pixels = batch['image'] * input_pipeline.STD_RGB + input_pipeline.MEAN_RGB
  assert pixels.min() > -0.5 and pixels.max() < 255.5 and pixels.std() > 10
  for i, ref_id in enumerate(batch['ref_id']):
    ann = coco.anns[refs[int(ref_id)]['ann_id']]
    want = np.asarray(Image.fromarray(coco.annToMask(ann)).resize((s, s), Image.NEAREST))
    np.testing.assert_array_equal(batch['mask'][i], want)
    # The tokens are one of the ref's sentences.
    n = batch['attention_mask'][i].sum()
    from eavl_jax import hub  # pylint: disable=g-import-not-at-top
    text = hub.load_tokenizer(config.model.text_encoder).decode(batch['input_ids'][i][1:n - 1])
    assert text in [t['raw'] for t in refs[int(ref_id)]['sentences']]


def test_same_seed_same_order_and_each_epoch_a_new_permutation(config, source):
  refs, _ = source
  n = input_pipeline.num_examples(config, 'train')
  assert n == len(_refs_in('train', refs))
  take = lambda it, k: [int(next(it)['ref_id'][0]) for _ in range(k)]
  a = take(_train(config, seed=1, batch_size=1), 2 * n)
  assert a == take(_train(config, seed=1, batch_size=1), 2 * n)
  assert a[:n] != take(_train(config, seed=2, batch_size=1), n)
  assert sorted(a[:n]) == sorted(a[n:]) == _refs_in('train', refs)
  assert a[:n] != a[n:]


@pytest.mark.parametrize('refs_per_image', [1, 2])
def test_restored_state_continues_exactly(config, refs_per_image):
  config = config.copy_and_resolve_references()
  config.data.refs_per_image = refs_per_image
  it = _train(config, seed=3, batch_size=2)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  restored = _train(config, seed=3, batch_size=2)      # a fresh loader, as after a restart
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_two_shards_disjoint_and_complete(config, source):
  refs, _ = source
  shards = []
  for index in range(2):
    it = _train(config, seed=0, shard_index=index, shard_count=2, batch_size=1)
    epoch = []                   # the shard's first epoch: everything before the first repeat
    while (ref_id := int(next(it)['ref_id'][0])) not in epoch:
      epoch.append(ref_id)
    shards.append(epoch)
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == _refs_in('train', refs)


def test_all_sentences_mode(config, source):
  refs, _ = source
  config = config.copy_and_resolve_references()
  config.data.sentences = 'all'
  n = input_pipeline.num_examples(config, 'train')
  assert n == sum(len(refs[r]['sentences']) for r in _refs_in('train', refs))
  it = _train(config, batch_size=1)
  seen = collections.Counter(int(next(it)['ref_id'][0]) for _ in range(n))
  assert seen == {r: len(refs[r]['sentences']) for r in _refs_in('train', refs)}


@pytest.mark.parametrize('shard_count, batch_size', [(1, 4), (2, 3)])
def test_eval_every_sentence_once_across_processes(config, source, shard_count, batch_size):
  refs, coco = source
  m = config.data.eval_max_size
  s = config.model.image_size
  want = {(r, j) for r in _refs_in('val', refs) for j in range(len(refs[r]['sentences']))}
  assert input_pipeline.num_examples(config, 'val') == len(want)
  seen, batch_counts = [], []
  for index in range(shard_count):
    batches = list(input_pipeline.make_eval_loader(config, 'val', shard_index=index,
                                                   shard_count=shard_count, batch_size=batch_size))
    batch_counts.append(len(batches))
    for b in batches:
      assert b['image'].shape == (batch_size, s, s, 3) and b['mask_orig'].shape == (batch_size, m, m)
      assert b['valid'].dtype == np.bool_ and b['orig_size'].dtype == np.int32
      for i in np.flatnonzero(b['valid']):
        ref = refs[int(b['ref_id'][i])]
        image = coco.imgs[ref['image_id']]
        h, w = b['orig_size'][i]
        assert (h, w) == (image['height'], image['width'])
        np.testing.assert_array_equal(b['mask_orig'][i, :h, :w], coco.annToMask(coco.anns[ref['ann_id']]))
        assert not b['mask_orig'][i, h:].any() and not b['mask_orig'][i, :, w:].any()
        seen.append((int(b['ref_id'][i]), int(b['sentence_index'][i])))
      assert not b['mask_orig'][~b['valid']].any() and (b['ref_id'][~b['valid']] == -1).all()
  assert len(set(batch_counts)) == 1
  assert sorted(seen) == sorted(want)
  assert batch_counts[0] == math.ceil(math.ceil(len(want) / shard_count) / batch_size)


def test_missing_records_and_unknown_split_are_clear_errors(config, tmp_path):
  c = config.copy_and_resolve_references()
  with pytest.raises(ValueError, match='no split'):
    input_pipeline.num_examples(c, 'testC')
  c.data.data_dir = str(tmp_path)
  with pytest.raises(ValueError, match='no eavl_refer/synthetic records'):
    input_pipeline.num_examples(c, 'train')


def test_refs_per_image_batches_k_refs_of_each_image_and_every_image_once_per_epoch(config,
                                                                                     source):
  refs, coco = source
  config = config.copy_and_resolve_references()
  config.data.refs_per_image = 2
  by_image = collections.defaultdict(list)
  for r in _refs_in('train', refs):
    by_image[refs[r]['image_id']].append(r)
  assert input_pipeline.num_examples(config, 'train') == 2 * len(by_image)
  s, l = config.model.image_size, config.model.max_tokens
  it = _train(config, seed=4, batch_size=4)
  batch = next(it)
  assert {k: v.shape for k, v in batch.items()} == {
      'image': (2, s, s, 3), 'input_ids': (4, l), 'attention_mask': (4, l), 'mask': (4, s, s),
      'ref_id': (4,)}
  for i, ref_id in enumerate(batch['ref_id']):     # the ref's own mask, on its image (i // 2)
    ann = coco.anns[refs[int(ref_id)]['ann_id']]
    want = np.asarray(Image.fromarray(coco.annToMask(ann)).resize((s, s), Image.NEAREST))
    np.testing.assert_array_equal(batch['mask'][i], want)
  one_image = collections.defaultdict(list)
  epoch = [batch] + [next(it) for _ in range(len(by_image) // 2 - 1)]
  for b in epoch:
    for pair in b['ref_id'].reshape(-1, 2):
      image_id = refs[int(pair[0])]['image_id']
      assert refs[int(pair[1])]['image_id'] == image_id     # K refs of one image
      assert len(set(pair)) == min(2, len(by_image[image_id]))  # distinct where it has K
      one_image[image_id].append(tuple(pair))
  # An epoch: every train image once (the last, incomplete batch of images is in the next).
  assert len(one_image) == len(epoch) * 2 and all(len(v) == 1 for v in one_image.values())
  assert set(one_image) <= set(by_image)
  # The image is decoded once for its K refs: that of the first ref's record.
  pixels = batch['image'][0] * input_pipeline.STD_RGB + input_pipeline.MEAN_RGB
  assert pixels.std() > 10


def test_refs_per_image_bad_settings_are_clear_errors(config):
  config = config.copy_and_resolve_references()
  config.data.refs_per_image = 3
  with pytest.raises(ValueError, match=r'refs_per_image=3 does not divide .* 4 expressions'):
    _train(config, batch_size=4)
  config.data.refs_per_image = 2
  config.data.sentences = 'all'
  with pytest.raises(ValueError, match=r"refs_per_image=2 .*needs config.data.sentences='random'"):
    _train(config, batch_size=4)
  config.data.refs_per_image = 0
  with pytest.raises(ValueError, match=r'refs_per_image=0: must be at least 1'):
    _train(config, batch_size=4)


def test_reader_threads_and_tokenizer_cache_do_not_change_the_batches(config, monkeypatch):
  """data.read_threads (grain.ReadOptions) and the per-sentence ids cache are speed only."""
  def batches(read_threads, cache_size):
    monkeypatch.setattr(input_pipeline.Tokenize, 'CACHE_SIZE', cache_size)
    c = config.copy_and_resolve_references()
    c.data.read_threads = read_threads
    it = _train(c, seed=3, batch_size=4)
    return [next(it) for _ in range(12)]    # > 1 epoch of the tiny train split: cache hits
  want = batches(16, 0)
  for got in (batches(0, 1 << 18), batches(2, 1 << 18)):
    for g, w in zip(got, want):
      assert g.keys() == w.keys()
      for k in w:
        np.testing.assert_array_equal(g[k], w[k], err_msg=k)
  c = config.copy_and_resolve_references()
  c.data.read_threads = -1                  # reaches grain.ReadOptions, which refuses it
  with pytest.raises(ValueError, match='num_threads'):
    next(_train(c))


def test_tokenizer_cache_returns_the_tokenizers_ids_read_only(config):
  tokenize = input_pipeline._tokenize(config)
  from eavl_jax import hub  # pylint: disable=g-import-not-at-top
  tokenizer = hub.load_tokenizer(config.model.text_encoder)
  for text in ('the red circle', 'left small square', 'the red circle'):
    ids, mask = tokenize(text)
    want = tokenizer(text, max_length=config.model.max_tokens, truncation=True,
                     padding='max_length')
    np.testing.assert_array_equal(ids, want['input_ids'])
    np.testing.assert_array_equal(mask, want['attention_mask'])
    assert not ids.flags.writeable and not mask.flags.writeable
  assert tokenize('the red circle')[0] is tokenize('the red circle')[0]   # the cached arrays
  assert len(tokenize._cache) == 2
  long = ' '.join(['circle'] * (config.model.max_tokens + 3))   # one token a word, + [CLS] [SEP]
  assert tokenize.dropped(long) == 5 and tokenize.dropped('the red circle') == 0


def test_eval_samples_say_how_many_tokens_were_cut(config, source):
  """tokens_dropped of every eval sample: the sentence's tokens beyond max_tokens (the synthetic
  sentences fit in 12 tokens; at 6 some do not)."""
  from eavl_jax import hub  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(config)   # the module's fixture stays as it is
  config.model.max_tokens = 6
  tokenizer = hub.load_tokenizer(config.model.text_encoder)
  refs, _ = source
  seen = 0
  for batch in input_pipeline.make_eval_loader(config, 'val', shard_index=0, shard_count=1,
                                               batch_size=4):
    for i in np.flatnonzero(batch['valid']):
      ref = refs[int(batch['ref_id'][i])]
      text = ref['sentences'][int(batch['sentence_index'][i])]['raw']
      want = max(0, len(tokenizer.encode(text)) - 6)
      assert batch['tokens_dropped'][i] == want
      seen += want > 0
  assert seen > 0


# ---------------------------------------------------------------- eval.protocol='lavt'


def lavt_reference_ids(vocab_file, sentence, max_tokens):
  """LAVT's ReferDataset, transcribed: its (slow, python) BertTokenizer's encode with the special
  tokens, cut at max_tokens, padded with 0; the attention mask 1 on the kept ids."""
  import transformers  # pylint: disable=g-import-not-at-top
  tokenizer = transformers.BertTokenizer(vocab_file, do_lower_case=True)
  attention_mask = [0] * max_tokens
  padded_input_ids = [0] * max_tokens
  input_ids = tokenizer.encode(text=sentence, add_special_tokens=True)
  input_ids = input_ids[:max_tokens]
  padded_input_ids[:len(input_ids)] = input_ids
  attention_mask[:len(input_ids)] = [1] * len(input_ids)
  return padded_input_ids, attention_mask, len(tokenizer.encode(sentence)) - 2


def test_lavt_token_rule_cuts_long_sentences_without_sep(config):
  """LAVT's 20 tokens: a sentence of 18 word pieces keeps [SEP]; of 19 or more it loses [SEP]
  (the cut list), where the project's rule keeps it."""
  from eavl_jax import hub  # pylint: disable=g-import-not-at-top
  vocab = os.path.join(hub.resolve_folder(config.model.text_encoder.tokenizer), 'vocab.txt')
  c = config.copy_and_resolve_references()
  c.model.max_tokens = 20
  lavt_rule = input_pipeline._tokenize(c, 'lavt')
  ours = input_pipeline._tokenize(c)
  sentences = {'short': 'the man on the left',
               '18': 'the tall man in the red shirt standing next to the small dog on the left '
                     'side today',
               'long': 'the tall man in the red shirt standing next to the small brown dog on the '
                       'left side of the picture near the big tree'}
  pieces = {}
  for name, text in sentences.items():
    want_ids, want_mask, pieces[name] = lavt_reference_ids(vocab, text, 20)
    ids, mask = lavt_rule(text)
    assert ids.dtype == mask.dtype == np.int32
    np.testing.assert_array_equal(ids, want_ids, err_msg=name)
    np.testing.assert_array_equal(mask, want_mask, err_msg=name)
    keep_sep_ids, _ = ours(text)
    same = np.array_equal(keep_sep_ids, ids)
    assert same == (pieces[name] <= 18), name     # the rules part only on long sentences
  assert pieces['short'] < 18 and pieces['18'] == 18 and pieces['long'] > 18
  sep = hub.load_tokenizer(c.model.text_encoder).sep_token_id
  ids, mask = lavt_rule(sentences['long'])
  assert mask.all() and sep not in ids.tolist()
  ids, mask = lavt_rule(sentences['18'])
  assert mask.all() and ids[-1] == sep


def torchvision_lavt_image(jpeg, size):
  """LAVT's test.py transform on the JPEG: PIL open + convert('RGB'), torchvision's F.resize to
  (size, size) (bilinear), F.to_tensor, F.normalize with ImageNet's mean and std -> (S, S, 3)."""
  import io  # pylint: disable=g-import-not-at-top
  from torchvision.transforms import functional as tvf  # pylint: disable=g-import-not-at-top
  img = Image.open(io.BytesIO(jpeg)).convert('RGB')
  img = tvf.resize(img, (size, size))
  x = tvf.normalize(tvf.to_tensor(img), mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
  return x.permute(1, 2, 0).numpy()


def test_protocol_lavt_eval_batches_are_lavts_inputs(config, source):
  """Under eval.protocol='lavt' the eval batch holds, bit for bit, the image torchvision makes in
  LAVT's test.py, its nearest-resized mask, and LAVT's token ids; 'original' keeps its own."""
  from eavl_jax import hub  # pylint: disable=g-import-not-at-top
  refs, _ = source
  c = config.copy_and_resolve_references()
  c.eval.protocol = 'lavt'
  s, l = c.model.image_size, c.model.max_tokens
  vocab = os.path.join(hub.resolve_folder(c.model.text_encoder.tokenizer), 'vocab.txt')
  records, _ = input_pipeline._records(c, 'val')
  by_ref = {int(records[i]['ref_id']): records[i] for i in range(len(records))}
  batch = next(input_pipeline.make_eval_loader(c, 'val', shard_index=0, shard_count=1,
                                               batch_size=4))
  original = next(input_pipeline.make_eval_loader(config, 'val', shard_index=0, shard_count=1,
                                                  batch_size=4))
  drafted = 0
  for i in np.flatnonzero(batch['valid']):
    record = by_ref[int(batch['ref_id'][i])]
    want = torchvision_lavt_image(record['image'], s)
    np.testing.assert_array_equal(batch['image'][i], want)
    drafted += not np.array_equal(original['image'][i], want)
    text = refs[int(batch['ref_id'][i])]['sentences'][int(batch['sentence_index'][i])]['raw']
    want_ids, want_mask, _ = lavt_reference_ids(vocab, text, l)
    np.testing.assert_array_equal(batch['input_ids'][i], want_ids)
    np.testing.assert_array_equal(batch['attention_mask'][i], want_mask)
    np.testing.assert_array_equal(batch['mask'][i], original['mask'][i])
  assert drafted   # the project's decoding (JPEG draft, other float order) is not LAVT's
  assert input_pipeline.eval_rules(c) == ('lavt', 'lavt')
  assert input_pipeline.eval_rules(config) == ('keep_sep', 'draft')


def test_a_record_damaged_inside_its_file_names_the_file(config, tmp_path):
  """Bytes overwritten in the middle of the train shard (its index at the end still reads, so the
  first-record check passes): the record that cannot be read is a ValueError naming the split,
  the file and the rebuild command, not Riegeli's error naming no file."""
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  damaged = copy.deepcopy(config)
  damaged.data.data_dir = str(tmp_path / 'records')
  shutil.copytree(config.data.data_dir, damaged.data.data_dir)
  [shard] = glob.glob(os.path.join(damaged.data.data_dir, '*', '*', '*', '*-train.array_record-*'))
  block = 1 << 16   # Riegeli's block size: a header at each multiple, which reading the index crosses
  assert os.path.getsize(shard) > 2 * block
  with open(shard, 'r+b') as f:   # a record's bytes in the second block, no header touched
    f.seek(block + 1024)
    f.write(b'\xff' * 1024)
  loader = _train(damaged, batch_size=4)   # opens, and its first-record check passes
  with pytest.raises(ValueError, match=(f"split 'train': the record file {shard} cannot be read "
                                        r'.*rebuild the records with python -m data_prep.build')):
    for _ in range(math.ceil(input_pipeline.num_examples(damaged, 'train') / 4) + 1):
      next(loader)
