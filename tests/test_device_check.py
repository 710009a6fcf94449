"""benchmarks/device_check.py, the prepared GPU check, as --smoke runs it on the CPU: every section
writes its keys, GPU-only figures are null with a reason, a section over its budget is stopped
and the next one runs; and its import path needs none of the data pipeline's packages."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import device_check  # pylint: disable=wrong-import-position

# Not on the GPU machine (benchmarks/device_wheels.sh): the check must import without them.
ABSENT_THERE = ('grain', 'tensorflow_datasets', 'array_record', 'pycocotools', 'tensorflow',
                'torch', 'timm', 'PIL', 'tensorboardX')


def run_check(tmp_path, *flags):
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.device_check', f'--out={tmp_path}', '--smoke', *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(tmp_path / 'device_check.json') as f:
    return json.load(f), result.stdout


def test_the_check_imports_without_the_data_pipeline():
  code = (f'import sys\nfor m in {ABSENT_THERE!r}:\n  sys.modules[m] = None\n'
          'import benchmarks.device_check, benchmarks.device_jobs\n'
          'print("imported", sorted(m for m in sys.modules if m.split(".")[0] in '
          f'{ABSENT_THERE!r} and sys.modules[m] is not None))\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'imported []' in result.stdout, result.stdout


def test_smoke_runs_every_section_and_leaves_gpu_figures_null_on_cpu(tmp_path):
  out, stdout = run_check(tmp_path)
  assert out['smoke'] and list(out['sections']) == list(device_check.SECTIONS)
  kinds = {'paper': 'train', 'lavt': 'train'}
  for name, section in out['sections'].items():
    assert section['status'] == 'ok', (name, section)
    labels = [label for label, _, _ in device_check.section_jobs(name, smoke=True)]
    assert list(section['runs']) == labels, (name, list(section['runs']))
    for run in section['runs'].values():
      assert set(device_check.KEYS[kinds.get(name, name)]) <= set(run), name
      assert run['status'] == 'ok' and run['backend'] == 'cpu'
  assert {name: list(out['sections'][name]['runs']) for name in ('paper', 'lavt')} == {
      'paper': ['float32'], 'lavt': ['bfloat16']}   # both dtypes and both models, one job each
  for name in ('paper', 'lavt'):
    for dtype, run in out['sections'][name]['runs'].items():
      assert run['dtype'] == dtype and run['batch'] == 2 and not run['remat']
      assert run['compile_s'] > 0 and run['step_s'] > 0 and run['flops_per_step'] > 0
      assert run['images_per_s'] == 2 / run['step_s'] and run['xla_memory']['peak_estimate'] > 0
      # GPU-only figures: null, with the reason, not made up
      assert run['mfu'] is None and run['peak_flops'] is None and 'cpu' in run['mfu_reason']
      assert run['peak_device_bytes'] is None and 'memory_stats' in run['peak_device_bytes_reason']
      p = run['projection']
      assert p['examples'] == 40 * 42404 and p['gpus'] == 8 and 'linear' in p['assumption']
      assert abs(p['hours'] - p['examples'] / (8 * run['images_per_s']) / 3600) < 1e-9
      assert run['projection']['paper_hours'] == (58.4 if name == 'paper' else None)
  inference = out['sections']['inference']['runs']['forward']
  assert inference['paper_fps'] == 8.78 and set(inference['runs']) == {'float32', 'bfloat16'}
  assert all(r['fps'] > 0 and r['gflops'] > 0 for r in inference['runs'].values())
  conv = out['sections']['dynamic_conv']['runs']['forms']
  assert {r['form'] for r in conv['rows']} == {'vmap_conv', 'grouped_conv', 'shifted_matmul',
                                               'shifted_autodiff'}
  assert conv['recommended_auto_form'] in conv['model_forms'] and conv['recommendation']
  numerics = out['sections']['numerics']['runs']['float32']
  assert set(numerics['precisions']) == {'default', 'highest'}
  for p in numerics['precisions'].values():   # both sides on the CPU here
    assert p['logits_max_abs_diff'] >= 0 and p['grad_norm_cpu'] > 0
  assert 'no accelerator' in numerics['note']
  assert 'figure' in stdout and 'smoke: CPU' in stdout and 'images/s' in stdout


def test_a_section_over_its_budget_is_stopped_and_the_next_runs(tmp_path):
  out, stdout = run_check(tmp_path, '--sections=inference,dynamic_conv', '--budget=inference=1')
  stopped = out['sections']['inference']
  assert stopped['status'] == 'stopped' and stopped['budget_s'] == 1
  run = stopped['runs']['forward']
  assert run['status'].startswith('stopped: over its budget'), run['status']
  assert set(device_check.KEYS['inference']) <= set(run)   # the keys, null: nothing measured
  conv = out['sections']['dynamic_conv']
  assert conv['status'] == 'ok' and conv['runs']['forms']['recommended_auto_form']
  assert 'stopped: over its budget' in stdout


def test_a_train_run_that_does_not_fit_is_run_again_with_remat(tmp_path, monkeypatch):
  """The parent alone (no JAX): a run whose record asks for remat is followed by its remat run."""
  calls = []

  def fake_job(kind, job_args, smoke, timeout, out_dir, name):
    calls.append((name, job_args))
    record = {k: None for k in device_check.KEYS[kind]}
    record.update(needs_remat='--remat' not in job_args and 'float32' in name, remat=False)
    return record, 'ok', 0.0

  monkeypatch.setattr(device_check, 'run_job', fake_job)
  args = device_check.parse_args([f'--out={tmp_path}', '--sections=paper'])
  section = device_check.run_section('paper', args, deadline=float('inf'))
  assert list(section['runs']) == ['float32', 'float32_remat', 'bfloat16'], list(section['runs'])
  assert calls[1] == ('paper_float32_remat', ['--model=paper', '--dtype=float32', '--remat'])
  assert section['status'] == 'ok' and section['budget_s'] == device_check.SECTIONS['paper'][0]
