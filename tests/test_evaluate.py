"""`python -m eavl_jax.evaluate` on the synthetic fixture with a briefly trained tiny model."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import jax.numpy as jnp
import pytest

from eavl_jax import checkpointing
from eavl_jax import evaluate
from eavl_jax import scoring
from eavl_jax import metrics
from eavl_jax import sharding

SPLITS = ('val', 'testA', 'testB')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sentence_counts(synthetic_raw, splits=SPLITS):
  """{split: number of sentences}, read straight from the raw refer files."""
  with open(os.path.join(synthetic_raw, 'synthetic', 'refs(unc).p'), 'rb') as f:
    refs = pickle.load(f)
  return {s: sum(len(r['sentences']) for r in refs if r['split'] == s) for s in splits}


def start_cli(module, *args, devices=1):
  """Starts `python -m module args` on `devices` (fake) CPU devices; `finish` waits for it. The
  tests start their command lines first and do their in-process work meanwhile."""
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                    f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, '-m', module, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)


def finish(proc):
  stdout, stderr = proc.communicate(timeout=600)
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith('error:')]


def test_cli_writes_one_object_per_split(tiny_trained, synthetic_records, synthetic_raw,
                                         tmp_path):
  # Two devices: the batches are split over them; the numbers must equal the one-device run below
  # (weakly: the briefly trained model predicts background everywhere; test_metrics.py and the
  # ground-truth test below check the numbers themselves).
  cli = start_cli('eavl_jax.evaluate', '--config=configs/tiny.py',
                  f'--workdir={tiny_trained.workdir}',
                  f'--config.data.data_dir={synthetic_records}',
                  f'--config.data.eval_max_size={tiny_trained.eval_max_size}', devices=2)

  # Meanwhile, one device, --checkpoint=<workdir>/checkpoints/<step> (a step folder) and results
  # in another workdir, --splits=val: only that split is evaluated, the JSON of the step keeps the
  # splits evaluated before.
  step_dir = os.path.join(tiny_trained.workdir, 'checkpoints', str(tiny_trained.steps))
  record = {'step': tiny_trained.steps, 'dataset': 'synthetic', 'data_dir': synthetic_records,
            'protocol': 'original', 'checkpoint': step_dir,
            'scoring': scoring.scoring_record(tiny_trained.config())}
  earlier = {**record, 'splits': {'testB': {'oIoU': 0.5, 'samples': 3}}}
  os.makedirs(tmp_path / 'eval')
  with open(evaluate.json_path(str(tmp_path), record), 'w') as f:
    json.dump(earlier, f)
  step, results, path = evaluate.run(tiny_trained.config(), str(tmp_path), splits=['val'],
                                     checkpoint=step_dir + '/')
  assert step == tiny_trained.steps and list(results) == ['val']
  assert path == evaluate.json_path(str(tmp_path), record)
  assert os.path.basename(path).startswith(f'{tiny_trained.steps}.synthetic.original.')
  with open(path) as f:
    assert json.load(f)['splits'] == {'testB': earlier['splits']['testB'], 'val': results['val']}

  proc = finish(cli)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Table I layout' in proc.stdout and 'Table II layout' in proc.stdout
  assert "protocol 'original' (scored at each image's original size)" in proc.stdout
  with open(evaluate.json_path(tiny_trained.workdir, record)) as f:
    saved = json.load(f)
  assert {k: saved[k] for k in record} == record
  assert sorted(saved['splits']) == sorted(SPLITS)
  assert saved['splits']['val'] == results['val']
  counts = sentence_counts(synthetic_raw)
  for split, result in saved['splits'].items():
    assert result['samples'] == counts[split] > 0
    assert result['truncated_expressions'] == 0   # the synthetic sentences fit max_tokens=12
    assert set(result) == (set(metrics.METRIC_KEYS) | set(metrics.DIVERSITY_KEYS)
                           | {'samples', 'truncated_expressions'})
    precisions = [result[f'Pr@0.{k}'] for k in range(5, 10)]
    assert all(0.0 <= v <= 1.0 for v in precisions + [result['oIoU'], result['mIoU']])
    assert all(0.0 <= result[k] <= 1.0 for k in metrics.DIVERSITY_KEYS)
    assert precisions == sorted(precisions, reverse=True)
    table_ii_row = next(line for line in proc.stdout.splitlines()
                        if line.startswith(f'{split} '))
    assert table_ii_row.split()[1:4] == [str(counts[split]), f'{100 * result["mIoU"]:.2f}',
                                         f'{100 * result["Pr@0.5"]:.2f}']
    diversity_row = [line for line in proc.stdout.splitlines() if line.startswith(f'{split} ')][1]
    assert diversity_row.split()[1:] == [str(counts[split])] + [
        f'{100 * result[k]:.2f}' for k in metrics.DIVERSITY_KEYS]


def test_ground_truth_scores_one_and_background_zero(tiny_trained, synthetic_raw):
  config = tiny_trained.config()
  counts = sentence_counts(synthetic_raw)
  # A batch size that leaves a padded tail in every split: padding must not count.
  batch = next(b for b in (3, 4, 5, 7) if all(n % b for n in counts.values()))
  mesh = sharding.make_mesh(config.mesh)
  ground_truth = lambda b: b['mask_orig'].astype(jnp.float32) * 2.0 - 1.0  # on the (M, M) canvas
  got = evaluate.evaluate_splits(config, ground_truth, SPLITS, mesh=mesh, batch_size=batch,
                                 logits_on_canvas=True)
  for split in SPLITS:
    assert got[split]['samples'] == counts[split]
    assert all(got[split][k] == 1.0 for k in metrics.METRIC_KEYS), got[split]

  background = lambda b: jnp.full(b['image'].shape[:1] + (16, 16), -1.0)  # every logit < 0
  got = evaluate.evaluate_splits(config, background, SPLITS, mesh=mesh, batch_size=batch)
  for split in SPLITS:
    assert got[split]['samples'] == counts[split]
    assert all(got[split][k] == 0.0 for k in metrics.METRIC_KEYS), got[split]
    assert got[split]['truncated_expressions'] == 0

  # eval.protocol='lavt': scored against the batch's mask at the input size (S, S).
  config.eval.protocol = 'lavt'
  at_input_size = lambda b: b['mask'].astype(jnp.float32) * 2.0 - 1.0   # (B, S, S)
  got = evaluate.evaluate_splits(config, at_input_size, SPLITS, mesh=mesh, batch_size=batch)
  for split in SPLITS:
    assert got[split]['samples'] == counts[split] and got[split]['oIoU'] == 1.0, got[split]


def test_the_train_split_is_evaluated_on_every_sentence(tiny_trained, synthetic_raw):
  # Its training epoch is another count (one sentence per ref, or K refs per image): evaluation
  # must not take that one.
  config = tiny_trained.config()
  config.data.refs_per_image = 2
  want = sentence_counts(synthetic_raw, ('train',))['train']
  mesh = sharding.make_mesh(config.mesh)
  ground_truth = lambda b: b['mask_orig'].astype(jnp.float32) * 2.0 - 1.0
  got, _ = scoring.evaluate_split(config, ground_truth, 'train', mesh=mesh, batch_size=4,
                                     logits_on_canvas=True)
  assert got['samples'] == want and got['mIoU'] == 1.0, got


def test_clear_errors(tiny_trained, synthetic_records, tmp_path):
  config, workdir = tiny_trained.config(), tiny_trained.workdir
  # The command line answers with one line naming the thing, not a traceback (checked below).
  no_checkpoint = start_cli('eavl_jax.evaluate', '--config=configs/tiny.py',
                            f'--workdir={tmp_path}', f'--config.data.data_dir={synthetic_records}')
  other_config = start_cli('eavl_jax.evaluate', '--config=configs/tiny.py', f'--workdir={workdir}',
                           f'--config.data.data_dir={synthetic_records}',
                           '--config.model.num_queries=2')
  # An unknown protocol fails before any slow work (here: generating the synthetic data).
  bad_protocol = start_cli('eavl_jax.evaluate', '--config=configs/tiny.py',
                           f'--workdir={tmp_path}/bad', '--config.eval.protocol=cris')

  with pytest.raises(FileNotFoundError, match='no checkpoint'):
    checkpointing.restore_variables(config, str(tmp_path))
  other = tiny_trained.config()
  other.model.num_queries = 2
  with pytest.raises(ValueError, match='another config'):
    checkpointing.restore_variables(other, workdir)
  with pytest.raises(ValueError, match='step 7'):
    checkpointing.restore_variables(config, workdir, checkpoint='7')
  with pytest.raises(ValueError, match='checkpoints/<step>'):
    checkpointing.restore_variables(config, workdir, checkpoint=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='no such checkpoint folder'):
    checkpointing.restore_variables(config, workdir, checkpoint=os.path.join(workdir, 'checkpoints', '9'))
  with pytest.raises(ValueError, match='either'):
    checkpointing.restore_variables(config, workdir, checkpoint='2', best=True)
  with pytest.raises(ValueError, match='validation mIoU'):  # trained without validation
    checkpointing.restore_variables(config, workdir, best=True)
  with pytest.raises(ValueError, match='no split'):
    scoring.evaluate_split(config, None, 'nonexistent', mesh=sharding.make_mesh(config.mesh))

  proc = finish(no_checkpoint)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert error_lines(proc.stderr) == [f'error: no checkpoint in {tmp_path}/checkpoints']
  proc = finish(other_config)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  [line] = error_lines(proc.stderr)
  assert line.startswith(f'error: the checkpoint at {workdir}/checkpoints/{tiny_trained.steps} '
                         'was written by another config')
  proc = finish(bad_protocol)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert error_lines(proc.stderr) == [
      "error: eval.protocol='cris': expected one of ['lavt', 'original']"]
  assert not os.path.exists(tmp_path / 'bad' / 'data')


def test_scoring_record_names_what_decides_the_digits(tiny_trained):
  """The eval JSON's 'scoring': the two protocols differ in every rule that changes a digit."""
  config = tiny_trained.config()
  original = scoring.scoring_record(config)
  config.eval.protocol = 'lavt'
  lavt = scoring.scoring_record(config)
  assert original['protocol'] == 'original' and lavt['protocol'] == 'lavt'
  assert lavt['image_size'] == original['image_size'] == config.model.image_size
  assert lavt['max_tokens'] == config.model.max_tokens
  assert lavt['records'] == original['records'] == {'resize_to': 0, 'mask_rule': 'union'}
  for key in ('image', 'ground_truth', 'token_rule', 'logits_upsampling'):
    assert lavt[key] != original[key], key
  assert 'align_corners=True' in lavt['logits_upsampling']
  assert 'loses [SEP]' in lavt['token_rule']
  json.dumps(lavt)   # plain JSON


def test_another_data_set_or_protocol_keeps_the_first_json(tiny_trained, synthetic_records,
                                                           tmp_path):
  """Results go to one file per (step, dataset, data_dir, protocol): evaluating the same
  checkpoint on another data_dir, or under another protocol, leaves the first file as it was."""
  other_records = str(tmp_path / 'other_records')
  shutil.copytree(synthetic_records, other_records)   # the same records, another data set's place
  step_dir = os.path.join(tiny_trained.workdir, 'checkpoints', str(tiny_trained.steps))
  workdir = str(tmp_path / 'run')
  written = []
  for data_dir, protocol in ((synthetic_records, 'original'), (other_records, 'original'),
                             (synthetic_records, 'lavt')):
    config = tiny_trained.config()
    config.data.data_dir, config.eval.protocol = data_dir, protocol
    _, results, path = evaluate.run(config, workdir, splits=['val'], checkpoint=step_dir)
    with open(path) as f:
      saved = json.load(f)
    assert saved == {'step': tiny_trained.steps, 'dataset': 'synthetic', 'data_dir': data_dir,
                     'protocol': protocol, 'checkpoint': step_dir,
                     'scoring': scoring.scoring_record(config), 'splits': results}
    assert saved['scoring']['protocol'] == protocol
    if written:   # the first file is unchanged
      with open(written[0][0]) as f:
        assert f.read() == written[0][1]
    with open(path) as f:
      written.append((path, f.read()))
  assert sorted(os.listdir(os.path.join(workdir, 'eval'))) == sorted(
      os.path.basename(p) for p, _ in written)   # three files

  # A file of the same name holding another checkpoint's results: an error before evaluating.
  with open(written[0][0], 'w') as f:
    json.dump({**json.loads(written[0][1]), 'checkpoint': '/elsewhere/checkpoints/2'}, f)
  with pytest.raises(ValueError, match='holds the results of'):
    evaluate.run(tiny_trained.config(), workdir, splits=['val'], checkpoint=step_dir)


def test_tables_under_protocol_lavt_print_test_pys_numbers_and_lavts_readme():
  """Under 'lavt' the tables print test.py's numbers (its arithmetic, not 100 x our fraction) and
  its printout per split; a LAVT model's reference row is LAVT's README."""
  i, u = [7, 0, 3, 1], [10, 4, 3, 3]
  result = {**metrics.summarize(i, u), 'lavt_test': metrics.lavt_test(i, u)}
  text = evaluate.format_tables('refcoco', 'released', {'val': result},
                                "protocol 'lavt' (scored at the 480x480 input size)", 'lavt')
  lines = text.splitlines()
  assert lines[0].startswith('LAVT on RefCOCO, checkpoint step released')
  oiou = next(line for line in lines if line.startswith('oIoU '))
  assert oiou.split()[-1] == '%.2f' % result['lavt_test']['overall IoU']
  readme = lines[lines.index(oiou) + 1].split()
  assert readme[-1] == '%.2f' % evaluate.LAVT_README['refcoco']['val'][5] and 'README' in readme
  assert metrics.lavt_test_printout(result['lavt_test']).rstrip('\n') in text
  eavl_text = evaluate.format_tables('refcoco', 1, {'val': metrics.summarize(i, u)},
                                     "protocol 'original'")
  assert 'paper (EAVL)' in eavl_text and 'Final results' not in eavl_text


def test_protocol_lavt_on_records_lavt_would_not_read_is_logged(caplog):
  scoring = lambda protocol, **records: {'protocol': protocol,
                                         'records': {'resize_to': 0, 'mask_rule': 'lavt', **records}}
  for quiet in (scoring('lavt'), scoring('original', mask_rule='union')):
    caplog.clear()
    evaluate.warn_if_not_lavts_records(quiet)
    assert 'mask_rule' not in caplog.text
  for loud in (scoring('lavt', mask_rule='union'), scoring('lavt', resize_to=480)):
    caplog.clear()
    evaluate.warn_if_not_lavts_records(loud)
    assert "eval.protocol='lavt' on records built with" in caplog.text
