"""TFDS builder `eavl_refer`: RefCOCO, RefCOCO+, G-Ref and the synthetic task as ArrayRecord.

One example per ref. No TensorFlow is needed to build or read: images and masks are stored as
encoded bytes (tfds.features.Image would need TF).

  image         bytes     the JPEG file as is, or re-encoded at `resize_to`² (JPEG, quality 95)
  mask          bytes     PNG (1 bit) of the original-size mask: union of the annotation's polygons / RLE
                          (mask_rule 'union'), or LAVT's: the pixels of exactly one polygon ('lavt')
  height, width int32     original image size (the mask's size)
  sentences     bytes[S]  every expression of the ref (`raw`, as LAVT reads it), stored as is
  sentence_ids  int64[S]
  ref_id, ann_id, image_id, category_id   int64
  bbox          float32[4]  COCO [x, y, w, h] in original pixels
  category, file_name       text

Records keep the refs file's order (shuffling off), so `info.metadata['sentences_per_ref'][split][i]`
is the sentence count of record i and `info.metadata['image_ids'][split][i]` its image: the input
pipeline enumerates sentences, and groups the refs of an image, without reading records.
"""
import io
import os

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from eavl_jax.data import refer

_bytes = lambda shape=(): tfds.features.Tensor(shape=shape, dtype=np.object_)
_int = lambda dtype=np.int64: tfds.features.Scalar(dtype=dtype)


def encode_mask(mask: np.ndarray) -> bytes:
  """(H, W) {0, 1} -> PNG bytes (1 bit per pixel)."""
  buf = io.BytesIO()
  Image.fromarray(mask.astype(bool)).save(buf, format='PNG')
  return buf.getvalue()


def decode_mask(png: bytes) -> np.ndarray:
  """PNG bytes -> (H, W) uint8 {0, 1}."""
  return np.asarray(Image.open(io.BytesIO(png)).convert('1'), dtype=np.uint8)


class EavlRefer(tfds.core.GeneratorBasedBuilder):
  """Referring-segmentation refs from the refer layout, one example per ref."""

  VERSION = tfds.core.Version('1.0.0')
  # Where TFDS looks for checksums / metadata files. Set here: inferring it goes through
  # etils' resource_path, which needs the importlib_resources package.
  code_path = epath.Path(os.path.abspath(__file__))
  pkg_dir_path = code_path.parent
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=name, description=f'{folder}, refs({split_by}).p')
      for name, (folder, split_by, _) in refer.DATASETS.items()
  ]

  def __init__(self, *, refer_root: str | None = None, image_root: str | None = None,
               resize_to: int | None = None, prepared: refer.Prepared | None = None,
               mask_rule: str = 'union', **kwargs):
    """refer_root / image_root: the raw layout (only to build); resize_to: store images at that
    square size; prepared: refs already read and checked by `refer.prepare` (else read here and any
    problem is an error); mask_rule: refer.MASK_RULES' key."""
    if mask_rule not in refer.MASK_RULES:
      raise ValueError(f'--mask_rule={mask_rule!r}: expected one of {sorted(refer.MASK_RULES)}')
    self._refer_root, self._image_root = refer_root, image_root
    self._resize_to, self._prepared, self._mask_rule = resize_to, prepared, mask_rule
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': _bytes(),
            'mask': _bytes(),
            'height': _int(np.int32),
            'width': _int(np.int32),
            'sentences': _bytes((None,)),
            'sentence_ids': tfds.features.Tensor(shape=(None,), dtype=np.int64),
            'ref_id': _int(),
            'ann_id': _int(),
            'image_id': _int(),
            'category_id': _int(),
            'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float32),
            'category': tfds.features.Text(),
            'file_name': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,        # record i = i-th kept ref of the split, see the docstring
        homepage='https://github.com/lichengunc/refer',
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    prepared = self._prepared
    if prepared is None:
      if not (self._refer_root and self._image_root):
        raise ValueError('EavlRefer: building needs refer_root= and image_root= (or prepared=)')
      prepared = refer.prepare(self._refer_root, self.builder_config.name, self._image_root)
      if prepared.problems:
        raise ValueError(refer.report(prepared))
    if prepared.dataset != self.builder_config.name:
      raise ValueError(f'prepared refs are {prepared.dataset!r}, builder config is '
                       f'{self.builder_config.name!r}')
    self.info.metadata.update({
        'refs_file': prepared.refs_path,
        'resize_to': self._resize_to or 0,
        'mask_rule': self._mask_rule,
        'sentences_per_ref': {s: [len(r['sentences']) for r in refs]
                              for s, refs in prepared.refs.items()},
        'ref_ids': {s: [int(r['ref_id']) for r in refs] for s, refs in prepared.refs.items()},
        'image_ids': {s: [int(r['image_id']) for r in refs] for s, refs in prepared.refs.items()},
        'dropped': [{'ref_id': int(p.ref_id), 'split': p.split, 'reason': p.reason}
                    for p in prepared.problems],
    })
    return {split: self._generate_examples(prepared, refs)
            for split, refs in prepared.refs.items()}

  def _image_bytes(self, path: str) -> bytes:
    with open(path, 'rb') as f:
      data = f.read()
    if not self._resize_to:
      return data
    with Image.open(io.BytesIO(data)) as im:
      im = im.convert('RGB').resize((self._resize_to, self._resize_to), Image.BILINEAR)
      buf = io.BytesIO()
      im.save(buf, format='JPEG', quality=95)
    return buf.getvalue()

  def _generate_examples(self, prepared: refer.Prepared, refs: list):
    for index, ref in enumerate(refs):
      ann = prepared.annotations[ref['ann_id']]
      image = prepared.images[ref['image_id']]
      h, w = int(image['height']), int(image['width'])
      mask = refer.annotation_mask(ann, h, w, self._mask_rule)
      path = prepared.image_paths[ref['image_id']]
      yield index, {
          'image': self._image_bytes(path),
          'mask': encode_mask(mask),
          'height': h,
          'width': w,
          'sentences': np.asarray([refer.sentence_text(s) for s in ref['sentences']], np.object_),
          'sentence_ids': np.asarray([s.get('sent_id', -1) for s in ref['sentences']], np.int64),
          'ref_id': int(ref['ref_id']),
          'ann_id': int(ref['ann_id']),
          'image_id': int(ref['image_id']),
          'category_id': int(ref.get('category_id', ann.get('category_id', -1))),
          'bbox': np.asarray(ann.get('bbox', [0, 0, 0, 0]), np.float32),
          'category': str(prepared.categories.get(ann.get('category_id'), '')),
          'file_name': image['file_name'],
      }
