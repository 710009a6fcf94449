"""`python -m eavl_jax.model_info --flops --speed --json` on configs/tiny.py; FLOP convention."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from eavl_jax import model_info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flops_count_a_multiply_add_as_two():
  # (m, k) @ (k, n): m n k multiply-adds; XLA's cost analysis must report 2 m n k FLOPs.
  m, k, n = 8, 16, 4
  compiled = jax.jit(lambda a, b: a @ b).lower(np.ones((m, k), np.float32),
                                               np.ones((k, n), np.float32)).compile()
  cost = model_info.forward_cost(compiled, batch_size=2)
  assert cost['flops_per_image'] == m * n * k      # 2 m n k FLOPs over a batch of 2
  assert cost['macs_per_image'] == m * n * k / 2


def test_cli_json_reports_params_flops_and_speed():
  proc = subprocess.run(
      [sys.executable, '-m', 'eavl_jax.model_info', '--config=configs/tiny.py', '--json',
       '--flops', '--speed', '--iterations=3', '--warmup=1'],
      capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)
  assert out['total'] == sum(out['components'].values()) > 0
  assert out['flops']['flops_per_image'] > 0
  assert out['flops']['macs_per_image'] == out['flops']['flops_per_image'] / 2
  assert out['speed']['images_per_second'] > 0 and out['speed']['backend'] == 'cpu'
  assert out['speed']['images_per_second'] == (out['speed']['batch_size']
                                               / out['speed']['seconds_per_batch'])
  assert out['paper_table_vi']['gflops'] == 131.01
