"""Builds one referring data set into TFDS ArrayRecord records (the command: data_prep/build.py).

Checks every ref first (annotation present, image file present and decodable, mask non-empty),
fails on any problem unless `allow_missing`, then writes the records and returns the counts per
split. `mask_rule`: how a ref's mask is made (refer.MASK_RULES).
"""
import os
import sys

from etils import epath
import tqdm

from eavl_jax.data import refer
from eavl_jax.data import refer_tfds


def counts_on_disk(dataset, data_dir) -> dict:
  """{split: {'refs': n, 'sentences': n}} of the records of `dataset` in `data_dir`, as written."""
  info = refer_tfds.EavlRefer(config=dataset, data_dir=data_dir).info
  return {split: {'refs': info.splits[split].num_examples,
                  'sentences': sum(info.metadata['sentences_per_ref'][split])}
          for split in info.splits}


def build(dataset: str, refer_root: str, image_root: str, data_dir: str,
          allow_missing: bool = False, resize_to: int | None = None, log=print,
          mask_rule: str = 'union', overwrite: bool = False) -> dict:
  """Builds `dataset`; returns {split: {'refs': n, 'sentences': n}, 'dropped': n}, the counts read
  back from the records written.

  Raises ValueError listing the problem refs when there are any and not `allow_missing`, and when
  `data_dir` already holds `dataset` and not `overwrite`.
  """
  data_dir = os.path.expanduser(data_dir)
  if resize_to is not None and resize_to < 1:
    raise ValueError(f'--resize_to={resize_to}: must be a positive size (0 or absent: as they are)')
  target = epath.Path(refer_tfds.EavlRefer(config=dataset, data_dir=data_dir).data_dir)
  if target.exists() and not overwrite:   # before the images are read
    raise ValueError(f'{target} already holds the records of {dataset}: pass --overwrite to '
                     'rebuild them (those records are replaced), or give another --data_dir')
  prepared = refer.prepare(refer_root, dataset, image_root,
                           progress=lambda it, total, desc: tqdm.tqdm(it, total=total, desc=desc,
                                                                      file=sys.stderr))
  log(f'images: {prepared.images_found}')
  log(refer.report(prepared))
  if prepared.problems and not allow_missing:
    raise ValueError(refer.report(prepared) + '\n(pass --allow_missing to build without them)')
  if prepared.problems:
    log(f'--allow_missing: dropped {len(prepared.problems)} ref(s)')
  if mask_rule not in refer.MASK_RULES:
    raise ValueError(f'--mask_rule={mask_rule!r}: expected one of {sorted(refer.MASK_RULES)}')
  builder = refer_tfds.EavlRefer(config=dataset, data_dir=data_dir, resize_to=resize_to,
                                 prepared=prepared, mask_rule=mask_rule,
                                 file_format='array_record')
  if target.exists():
    log(f'--overwrite: replacing {target}')
    target.rmtree()
  builder.download_and_prepare()
  counts = counts_on_disk(dataset, data_dir)
  counts['dropped'] = len(prepared.problems)
  log(f'{dataset} -> {builder.data_dir}')
  log(f'{"split":<8} {"refs":>8} {"sentences":>10}')
  for split, c in counts.items():
    if split != 'dropped':
      log(f'{split:<8} {c["refs"]:>8} {c["sentences"]:>10}')
  return counts

