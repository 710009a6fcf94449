"""`python -m eavl_jax.evaluate` on the synthetic fixture with a briefly trained tiny model."""
import json
import os
import pickle
import subprocess
import sys

import jax.numpy as jnp
import pytest

from configs import tiny
from eavl_jax import evaluate
from eavl_jax import sharding
from eavl_jax import trainer

SPLITS = ('val', 'testA', 'testB')
TRAIN_STEPS = 2
EVAL_MAX_SIZE = 128  # the synthetic images are 128 x 128


def tiny_config(data_dir):
  config = tiny.get_config()
  config.data.data_dir = data_dir
  config.data.eval_max_size = EVAL_MAX_SIZE
  config.train.num_steps = TRAIN_STEPS
  config.train.checkpoint_every_steps = TRAIN_STEPS
  config.train.eval_every_steps = 0   # no validation during the brief training
  return config


def sentence_counts(synthetic_raw):
  """{split: number of sentences}, read straight from the raw refer files."""
  with open(os.path.join(synthetic_raw, 'synthetic', 'refs(unc).p'), 'rb') as f:
    refs = pickle.load(f)
  return {s: sum(len(r['sentences']) for r in refs if r['split'] == s) for s in SPLITS}


@pytest.fixture(scope='module')
def trained_workdir(synthetic_records, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('eval_tiny_run'))
  trainer.train_and_evaluate(tiny_config(synthetic_records), workdir)
  return workdir


def run_cli(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        timeout=600, check=False)


def test_cli_writes_one_object_per_split(trained_workdir, synthetic_records, synthetic_raw):
  proc = run_cli('eavl_jax.evaluate', '--config=configs/tiny.py', f'--workdir={trained_workdir}',
                 f'--config.data.data_dir={synthetic_records}',
                 f'--config.data.eval_max_size={EVAL_MAX_SIZE}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Table I layout' in proc.stdout and 'Table II layout' in proc.stdout
  with open(os.path.join(trained_workdir, 'eval', f'{TRAIN_STEPS}.json')) as f:
    saved = json.load(f)
  assert saved['step'] == TRAIN_STEPS and saved['dataset'] == 'synthetic'
  assert sorted(saved['splits']) == sorted(SPLITS)
  counts = sentence_counts(synthetic_raw)
  for split, result in saved['splits'].items():
    assert result['samples'] == counts[split] > 0
    assert set(result) == {'oIoU', 'mIoU', 'Pr@0.5', 'Pr@0.6', 'Pr@0.7', 'Pr@0.8', 'Pr@0.9',
                           'samples'}
    precisions = [result[f'Pr@0.{k}'] for k in range(5, 10)]
    assert all(0.0 <= v <= 1.0 for v in precisions + [result['oIoU'], result['mIoU']])
    assert precisions == sorted(precisions, reverse=True)
    assert f'{100 * result["mIoU"]:.2f}' in proc.stdout

  # --splits evaluates only those; the JSON of that step keeps the others.
  step, results, path = evaluate.run(tiny_config(synthetic_records), trained_workdir,
                                     splits=['val'], checkpoint=str(TRAIN_STEPS))
  assert step == TRAIN_STEPS and list(results) == ['val']
  assert results['val'] == saved['splits']['val']
  with open(path) as f:
    assert sorted(json.load(f)['splits']) == sorted(SPLITS)


def test_ground_truth_scores_one_and_background_zero(synthetic_records, synthetic_raw):
  config = tiny_config(synthetic_records)
  counts = sentence_counts(synthetic_raw)
  # A batch size that leaves a padded tail in every split: padding must not count.
  batch = next(b for b in (3, 4, 5, 7) if all(n % b for n in counts.values()))
  mesh = sharding.make_mesh(config.mesh)
  ground_truth = lambda b: b['mask_orig'].astype(jnp.float32) * 2.0 - 1.0  # on the (M, M) canvas
  got = evaluate.evaluate_splits(config, ground_truth, SPLITS, mesh=mesh, batch_size=batch,
                                 logits_on_canvas=True)
  for split in SPLITS:
    assert got[split]['samples'] == counts[split]
    assert all(got[split][k] == 1.0 for k in got[split] if k != 'samples'), got[split]

  background = lambda b: jnp.full(b['image'].shape[:1] + (16, 16), -1.0)  # every logit < 0
  got = evaluate.evaluate_splits(config, background, SPLITS, mesh=mesh, batch_size=batch)
  for split in SPLITS:
    assert got[split]['samples'] == counts[split]
    assert all(got[split][k] == 0.0 for k in got[split] if k != 'samples'), got[split]


def test_clear_errors(trained_workdir, synthetic_records, tmp_path):
  config = tiny_config(synthetic_records)
  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    evaluate.restore_params(config, str(tmp_path))
  other = tiny_config(synthetic_records)
  other.model.num_queries = 2
  with pytest.raises(ValueError, match='another config'):
    evaluate.restore_params(other, trained_workdir)
  with pytest.raises(ValueError, match='step 7'):
    evaluate.restore_params(config, trained_workdir, checkpoint='7')
  with pytest.raises(ValueError, match='checkpoints/<step>'):
    evaluate.restore_params(config, trained_workdir, checkpoint=str(tmp_path))
  with pytest.raises(ValueError, match='either'):
    evaluate.restore_params(config, trained_workdir, checkpoint='2', best=True)
  with pytest.raises(ValueError, match='no split'):
    evaluate.evaluate_split(config, None, 'nonexistent', mesh=sharding.make_mesh(config.mesh))

  # The command line answers with one line, not a traceback.
  proc = run_cli('eavl_jax.evaluate', '--config=configs/tiny.py', f'--workdir={tmp_path}',
                 f'--config.data.data_dir={synthetic_records}')
  assert proc.returncode == 1
  assert 'error: no checkpoint in' in proc.stderr and 'Traceback' not in proc.stderr
