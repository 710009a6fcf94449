"""The profiling benchmark runs end to end on the tiny config and attributes the time it saw."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profile_ops_tables(tmp_path):
  out = tmp_path / 'profile.json'
  result = subprocess.run(
      [sys.executable, 'benchmarks/profile_ops.py', '--config=configs/tiny.py', '--batch=2',
       '--steps=1', '--target=vision_encoder', '--top=5', f'--json_out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'kind of op' in result.stdout and 'part of the model (pass)' in result.stdout
  data = json.loads(out.read_text())
  assert data['op_ms'] > 0
  assert abs(sum(data['by_kind'].values()) - data['op_ms']) < 1e-6 * max(1.0, data['op_ms'])
  assert data['by_kind'].get('dense matmuls (incl. weight gradients)', 0) > 0
  # the Swin's stages appear, split into forward and backward
  parts = set(data['by_part'])
  assert any(p.startswith('layers_0/blocks_0 (forward)') for p in parts), parts
  assert any(p.startswith('layers_0/blocks_0 (backward)') for p in parts), parts


def test_train_loader_variants_give_the_same_batches(tmp_path):
  result = subprocess.run(
      [sys.executable, 'benchmarks/train_loader.py', '--config=configs/tiny.py',
       '--config.data.synthetic_images=40', f'--workdir={tmp_path}', '--batches=3'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'same batches in every variant: True' in result.stdout, result.stdout
  rows = [l for l in result.stdout.splitlines() if l.rstrip().endswith('x')]
  assert len(rows) == 3 and all(float(l.split()[-2]) > 0 for l in rows), result.stdout


def test_refcoco_smoke_runs_the_trainer_on_a_refer_fixture(tmp_path):
  """The paper-config smoke run at the tiny model's sizes: fixture in the refcoco layout, built,
  2 train steps and a validation through trainer.train_and_evaluate; its numbers are measured."""
  out = tmp_path / 'smoke.json'
  result = subprocess.run(
      [sys.executable, 'benchmarks/refcoco_smoke.py', '--config=configs/tiny.py',
       '--config.data.dataset=refcoco', '--images=6', '--image_px=96', f'--workdir={tmp_path}',
       f'--json_out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  refs = tmp_path / 'refer' / 'refcoco'
  assert (refs / 'refs(unc).p').is_file() and (refs / 'instances.json').is_file()
  images = sorted(os.listdir(tmp_path / 'refer' / 'images'))
  assert len(images) == 6 and all(n.startswith('COCO_train2014_') for n in images), images
  assert os.listdir(tmp_path / 'run' / 'checkpoints') == ['2']    # trained 2 steps
  data = json.loads(out.read_text())
  assert data['compile_s'] > 0 and len(data['step_s']) == 2 and len(data['eval_s']) == 1
  assert data['memory']['needed'] == (data['memory']['argument'] + data['memory']['output']
                                      + data['memory']['temp'] - data['memory']['alias']) > 0
  assert data['peak_rss_bytes'] > 0
  samples = data['validation']['samples']
  assert samples > 0 and 0 <= data['validation']['oIoU'] <= 1
  assert 'train step compile' in result.stdout and f'validation on val ({samples} ' in result.stdout


def _tiny_step(model_name, head='fixed'):
  sys.path.insert(0, ROOT)
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.name, config.model.lavt.head = model_name, head
  config.data.refs_per_image = 2
  return train_step, train_step.Step(config, batch_size=4)


def test_train_step_components_cover_every_submodule_of_eavl_and_lavt():
  """benchmarks/train_step.py's component table: every top-level submodule is captured, on the
  step's own batch (2 images x 2 expressions), and falls in one group of the printed table."""
  import jax  # pylint: disable=g-import-not-at-top
  for name, head in (('eavl', 'fixed'), ('lavt', 'fixed'), ('lavt', 'aligner')):
    train_step, step = _tiny_step(name, head)
    variables = jax.eval_shape(
        lambda k, step=step: step.model.init(k, *train_step.builder.dummy_inputs(
            step.config.model, 1), train=False), jax.random.PRNGKey(0))
    calls, out_shapes = train_step.capture_components(step, variables)
    assert set(calls) == set(variables['params']), (name, head, set(calls))
    grouped = {n for _, names in train_step.GROUPS[name] for n in names}
    assert set(calls) <= grouped, (name, set(calls) - grouped)
    assert out_shapes['logits'].shape[0] == 4                       # 4 expressions
    images = calls['vision_encoder'][1][0].shape[0]
    assert images == (2 if name == 'eavl' else 4), (name, images)  # LAVT: once per expression
    if name == 'lavt':
      assert 'between_stages' not in calls['vision_encoder'][2]
      assert {'pwam_0', 'pwam_3', 'gate_2', 'decoder'} <= set(calls)
