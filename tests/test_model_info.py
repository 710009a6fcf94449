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
  assert out['total_table_vi'] == sum(out['components_table_vi'].values())
  assert 0 < out['total_table_vi'] < out['total'] and 'table VI rule' in out['table_vi_rule']
  assert out['flops']['flops_per_image'] > 0
  assert out['flops']['macs_per_image'] == out['flops']['flops_per_image'] / 2
  assert out['speed']['images_per_second'] > 0 and out['speed']['backend'] == 'cpu'
  assert out['speed']['images_per_second'] == (out['speed']['batch_size']
                                               / out['speed']['seconds_per_batch'])
  assert out['paper_table_vi']['gflops'] == 131.01


def hook_counted(module, *inputs, **kwargs):
  """What a hook-based counter (thop) adds up: the parameters of the Linear, Conv2d and LayerNorm
  modules that ran in one forward pass (not nn.Embedding, not bare nn.Parameters)."""
  import torch  # pylint: disable=g-import-not-at-top
  counted = set()
  hooks = [m.register_forward_hook(lambda m, i, o: counted.add(m)) for m in module.modules()
           if type(m) in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)]
  with torch.no_grad():
    module(*inputs, **kwargs)
  for h in hooks:
    h.remove()
  return sum(p.numel() for m in counted for p in m.parameters())


def test_table_vi_counts_match_a_hook_counter_on_the_torch_encoders_and_closed_forms():
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  m, v, t = config.model, config.model.vision_encoder, config.model.text_encoder
  shapes = model_info.abstract_params(m)
  every = model_info.count_by_component(shapes)
  rule = model_info.count_by_component(shapes, table_vi=True)
  assert sum(every.values()) == sum(x.size for x in jax.tree.leaves(shapes))

  bert = transformers.BertModel(transformers.BertConfig(
      vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
      num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
      max_position_embeddings=t.max_position_embeddings), add_pooling_layer=False).eval()
  ids = torch.ones((1, m.max_tokens), dtype=torch.long)
  assert rule['bert'] == hook_counted(bert, ids)
  assert every['bert'] == sum(p.numel() for p in bert.parameters())

  swin = timm.create_model('swin_base_patch4_window12_384', pretrained=False, num_classes=0,
                           img_size=m.image_size, embed_dim=v.embed_dim, depths=v.depths,
                           num_heads=v.num_heads, window_size=v.window_size).eval()
  # Ours has no classifier; EAVL's LayerNorms on stages 2 and 3 (vision_norm_2, _3) come on top
  # of timm's final norm (our vision_norm_4).
  ours_extra = 2 * (2 * v.embed_dim + 4 * v.embed_dim)
  assert rule['swin'] == hook_counted(swin, torch.zeros(1, 3, m.image_size, m.image_size)) \
      + ours_extra
  tables = sum(p.numel() for n, p in swin.named_parameters() if 'relative_position_bias_table' in n)
  assert every['swin'] == sum(p.numel() for p in swin.parameters()) + ours_extra
  assert every['swin'] - rule['swin'] == tables > 0
  embeddings = (t.vocab_size + t.max_position_embeddings + t.type_vocab_size) * t.hidden_size
  assert sum(every.values()) - sum(rule.values()) == embeddings + tables
  for name in set(every) - {'swin', 'bert'}:     # the head: Dense, Conv and norm layers only
    assert rule[name] == every[name] > 0


def test_lavt_configs_print_table_vis_lavt_row():
  # Both LAVT heads sit beside table VI's LAVT row (there is no LAVT + aligner row), not EAVL's.
  proc = subprocess.run(
      [sys.executable, '-m', 'eavl_jax.model_info', '--config=configs/tiny.py',
       '--config.model.name=lavt', '--config.model.lavt.head=aligner'],
      capture_output=True, text=True, timeout=300, check=False, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  paper = [line for line in proc.stdout.splitlines() if line.startswith('paper (table VI)')]
  assert len(paper) == 1 and paper[0].split()[3:] == ['203.71', 'LAVT'], proc.stdout
  lavt = model_info.PAPER_ROWS['lavt']
  assert (lavt['params_m'], lavt['gflops'], lavt['fps']) == (203.71, 124.71, 6.69)
