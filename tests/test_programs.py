"""Every program of the project (`python -m ...`) defines its flags only when run: pytest, a
notebook or another program can import any number of them into one interpreter."""
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def program_modules():
  """Modules with a `__main__` block under eavl_jax/, data_prep/ and benchmarks/."""
  found = []
  for package in ('eavl_jax', 'data_prep', 'benchmarks'):
    for path in sorted(glob.glob(os.path.join(ROOT, package, '*.py'))):
      with open(path) as f:
        if "__name__ == '__main__'" in f.read():
          found.append(f'{package}.{os.path.basename(path)[:-3]}')
  return found


def test_all_programs_import_into_one_interpreter():
  modules = program_modules()
  assert {'eavl_jax.train', 'eavl_jax.evaluate', 'eavl_jax.convert',
          'data_prep.synthetic_errors'} <= set(modules)
  code = ''.join(f'import {m}\n' for m in modules) + 'print("imported", len(%r))' % modules
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'imported {len(modules)}' in out.stdout
