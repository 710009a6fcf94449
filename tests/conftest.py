"""Session-wide data fixtures: a tiny synthetic data set, raw and built (shared by test files)."""
import os

import pytest

from data_prep import build
from data_prep import synthetic

NUM_IMAGES = 12
SEED = 0


@pytest.fixture(scope='session')
def synthetic_raw(tmp_path_factory):
  """Folder of a 12-image synthetic data set in the refer layout.

  refer_root = the folder, images = <folder>/images, dataset = 'synthetic'.
  """
  out = str(tmp_path_factory.mktemp('synthetic_raw'))
  synthetic.generate(out, NUM_IMAGES, SEED)
  return out


@pytest.fixture(scope='session')
def synthetic_records(synthetic_raw, tmp_path_factory):
  """TFDS data_dir holding eavl_refer/synthetic built from `synthetic_raw`: set
  `config.data.data_dir` to it (with config.data.dataset = 'synthetic', e.g. configs/tiny.py)."""
  data_dir = str(tmp_path_factory.mktemp('synthetic_records'))
  build.build('synthetic', synthetic_raw, os.path.join(synthetic_raw, 'images'), data_dir,
              log=lambda *a: None)
  return data_dir
