"""Every program of the project (`python -m ...`) defines its flags only when run: pytest, a
notebook or another program can import any number of them into one interpreter."""
import glob
import os
import subprocess
import sys

from eavl_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def program_modules():
  """Modules with a `__main__` block under eavl_jax/, data_prep/, tools/ and benchmarks/."""
  found = []
  for package in ('eavl_jax', 'data_prep', 'tools', 'benchmarks'):
    for path in sorted(glob.glob(os.path.join(ROOT, package, '*.py'))):
      with open(path) as f:
        if "__name__ == '__main__'" in f.read():
          found.append(f'{package}.{os.path.basename(path)[:-3]}')
  return found


def test_all_programs_import_into_one_interpreter():
  modules = program_modules()
  assert {'eavl_jax.train', 'eavl_jax.evaluate', 'eavl_jax.convert',
          'data_prep.build', 'tools.synthetic_errors'} <= set(modules)
  code = ''.join(f'import {m}\n' for m in modules) + 'print("imported", len(%r))' % modules
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'imported {len(modules)}' in out.stdout


def test_every_entry_point_refuses_a_bad_config_with_one_error_line_before_any_work(tmp_path):
  """configs/synthetic.py generates its data on the first run (30 s): a bad value is refused
  before that (no <workdir>/data), as one `error:` line, by every program taking a config."""
  bad = ['--config=configs/synthetic.py', '--config.model.num_queries=0']
  work = f'--workdir={tmp_path}/work'
  commands = {
      'eavl_jax.train': bad + [work],
      'eavl_jax.evaluate': bad + [work],
      'eavl_jax.predict': bad + [work, '--image=x.jpg', '--text=a', f'--out={tmp_path}/o.png'],
      'eavl_jax.model_info': bad,
      'eavl_jax.convert': bad + [f'--out={tmp_path}/converted'],
      'benchmarks.ablations': bad + [work, '--seeds=0', '--rows=full'],
  }
  procs = {m: subprocess.Popen([sys.executable, '-m', m, *args], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for m, args in commands.items()}
  for module, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert proc.returncode != 0 and 'Traceback' not in err, (module, err[-2000:])
    assert errors == ['error: model.num_queries=0: must be at least 1'], (module, err[-2000:])
  assert not os.path.exists(tmp_path / 'work' / 'data')
  assert not os.path.exists(tmp_path / 'converted')


def test_convert_with_nothing_to_convert_prints_one_error_line(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'eavl_jax.convert', '--config=configs/tiny.py',
                         f'--out={tmp_path}'], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: model.vision_encoder.pretrained='scratch' and model.text_encoder.pretrained="
      "'scratch': nothing to convert; set them to the checkpoints to convert (docs/weights.md)")


def test_training_the_paper_config_without_a_swin_checkpoint_stops_at_once(tmp_path):
  """configs/refcoco.py as a new user runs it: one line naming the key and how to set it."""
  proc = subprocess.run([sys.executable, '-m', 'eavl_jax.train', '--config=configs/refcoco.py',
                         f'--workdir={tmp_path}', f'--config.data.data_dir={tmp_path}/records'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
  assert errors[0].startswith("error: model.vision_encoder.pretrained is '' (Swin would start "
                              'from random weights): set it to a Swin checkpoint')
  assert 'Traceback' not in proc.stderr and os.listdir(tmp_path) == []


def test_an_unknown_config_key_is_one_line_naming_the_closest_keys(tmp_path, monkeypatch):
  proc = subprocess.run([sys.executable, '-m', 'eavl_jax.train', '--config=configs/tiny.py',
                         '--config.model.num_querys=4', f'--workdir={tmp_path}'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      "error: --config.model.num_querys: config.model has no key 'num_querys' (did you mean "
      'num_queries?)']
  assert os.listdir(tmp_path) == []
  tiny = '--config=configs/tiny.py'
  monkeypatch.chdir(ROOT)   # the config file's path as a user gives it
  assert cli.unknown_config_key([tiny, '--config.modle.dtype=x']) == (
      "--config.modle.dtype: config has no key 'modle' (did you mean model?)")
  assert cli.unknown_config_key([tiny, '--config.seed.x=1']).endswith(
      '(config.seed is a value, not a group)')
  assert cli.unknown_config_key([tiny, '--config.model.num_queries=2', '--config.seed=1']) is None


def test_a_missing_or_wrong_checkpoint_file_is_one_line_before_the_compile(tmp_path):
  """configs/refcoco.py with a Swin path that does not exist, or that is a text file named .pth:
  one line naming the key (before: minutes of compiles, then a memory error or a torch error)."""
  text_file = tmp_path / 'x.pth'
  text_file.write_text('not a checkpoint')
  cases = {'/nonexistent.pth': "error: model.vision_encoder.pretrained='/nonexistent.pth': no "
                               'such file or folder',
           str(text_file): f"error: model.vision_encoder.pretrained='{text_file}': not a PyTorch "
                           'checkpoint'}
  procs = {path: subprocess.Popen(
      [sys.executable, '-m', 'eavl_jax.train', '--config=configs/refcoco.py',
       f'--workdir={tmp_path}/run', f'--config.data.data_dir={tmp_path}/records',
       f'--config.model.vision_encoder.pretrained={path}'],
      cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for path in cases}
  for path, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert proc.returncode == 1 and len(errors) == 1 and 'Traceback' not in err, err[-2000:]
    assert errors[0].startswith(cases[path]), errors[0]
  assert not os.path.exists(tmp_path / 'run')
