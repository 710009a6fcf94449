"""The library (eavl_jax/, its data layer eavl_jax/data/ included) imports nothing above it: neither
the research scripts of tools/, nor a command-line module, nor the data commands of data_prep/, nor
configs/; it imports without tools/; and it is all that `pip install .` installs."""
import ast
import os
import subprocess
import sys
import tomllib

import setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ('eavl_jax',)
ABOVE = ('tools', 'data_prep', 'configs', 'eavl_jax.train', 'eavl_jax.evaluate', 'eavl_jax.predict', 'eavl_jax.model_info',
         'eavl_jax.convert')


def layer_modules():
  """-> [(dotted module name, file path)] of every .py file under eavl_jax/."""
  found = []
  for package in LAYERS:
    for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
      dirs[:] = sorted(d for d in dirs if d != '__pycache__')
      for name in sorted(f for f in files if f.endswith('.py')):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, ROOT)[:-len('.py')].split(os.sep)
        found.append(('.'.join(parts[:-1] if parts[-1] == '__init__' else parts), path))
  return found


def imported_modules(module, path):
  """-> [(line, dotted name)] of every import statement of the file, those inside functions too;
  `from a import b` gives both 'a' and 'a.b' (b may be a module); relative imports resolved."""
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      found.append((node.lineno, base))
      found += [(node.lineno, f'{base}.{alias.name}') for alias in node.names]
  return found


def is_above(name):
  return any(name == a or name.startswith(a + '.') for a in ABOVE)


def test_imported_modules_reads_every_form_of_import(tmp_path):
  folder = tmp_path / 'pkg'
  folder.mkdir()
  (folder / 'mod.py').write_text(
      'import tools.synthetic_probe\nfrom eavl_jax import evaluate, metrics\n'
      'def f():\n  from . import sibling\n  from .sub import x\n')
  names = [n for _, n in imported_modules('pkg.mod', str(folder / 'mod.py'))]
  assert names == ['tools.synthetic_probe', 'eavl_jax', 'eavl_jax.evaluate', 'eavl_jax.metrics',
                   'pkg', 'pkg.sibling', 'pkg.sub', 'pkg.sub.x']
  assert [n for n in names if is_above(n)] == ['tools.synthetic_probe', 'eavl_jax.evaluate']


def test_no_module_of_the_layers_imports_tools_or_a_command_line_module():
  modules = layer_modules()
  assert {'eavl_jax.trainer', 'eavl_jax.models.eavl', 'eavl_jax.weights',
          'eavl_jax.data.synthetic'} <= {m for m, _ in modules}
  upward = [f'{os.path.relpath(path, ROOT)}:{line} imports {name}'
            for module, path in modules for line, name in imported_modules(module, path)
            if is_above(name)]
  assert not upward, '\n'.join(upward)


def test_every_module_of_the_layers_imports_without_tools():
  """A fresh interpreter where `tools` cannot be found imports every module of the layers."""
  modules = [m for m, _ in layer_modules()]
  code = '\n'.join([
      'import importlib, sys',
      'class NoTools:',
      '  def find_spec(self, name, path=None, target=None):',
      "    if name == 'tools' or name.startswith('tools.'):",
      "      raise ModuleNotFoundError(f'{name}: tools/ is absent here')",
      'sys.meta_path.insert(0, NoTools())',
      f'root = {ROOT!r}',
      "sys.path[:] = [p for p in sys.path if p and p != root and not p.startswith(root + '/tools')]",
      'try:',
      '  import tools',
      'except ModuleNotFoundError:',
      '  pass',
      'else:',
      "  raise SystemExit('tools/ is still importable')",
      f'for m in {modules!r}:',
      '  importlib.import_module(m)',
      'print("imported", len(sys.modules))'])
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'imported' in out.stdout


def test_install_holds_the_library_only():
  """pyproject's package list: eavl_jax and its subpackages, not the generic names of the clone's
  top-level folders (configs, data_prep, tools, benchmarks, tests) in a user's site-packages."""
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    find = tomllib.load(f)['tool']['setuptools']['packages']['find']
  packages = setuptools.find_packages(ROOT, include=find['include'])
  assert {'eavl_jax', 'eavl_jax.data', 'eavl_jax.models', 'eavl_jax.weights'} <= set(packages)
  assert [p for p in packages if p.split('.')[0] != 'eavl_jax'] == []
