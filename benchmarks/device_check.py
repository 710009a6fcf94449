"""One prepared check for a GPU, one command: the paper's train step, inference, the aligner's
dynamic convolution, the GPU's numerics against the host CPU's, and LAVT's train step, each
section within its own time budget (docs/performance.md, "On a GPU").

  python -m benchmarks.device_check --out=DIR [--smoke] [--sections=paper,inference,...]
      [--budget=SECTION=SECONDS ...] [--total_budget=SECONDS]

Writes DIR/device_check.json (again after every job, so that a run cut short keeps what it
measured), each job's log under DIR/logs/, and prints one table. Every job is a process of its
own (benchmarks/device_jobs.py), killed when its section's budget (or the total's) runs out: the
section is reported as stopped, with what its jobs had written, and the next section starts. A
process per job also gives each train step its own `memory_stats()['peak_bytes_in_use']`, which
never goes down within a process. This process starts no JAX backend, so on a GPU the jobs have
the device to themselves.

Sections (--smoke: the same code on the CPU, at configs/tiny.py's model sizes, batch 2, a tiny
convolution shape, few repeats, one dtype per train section: float32 for paper, bfloat16 for lavt,
so that both models and both dtypes run; its figures say nothing about speed):
  paper         configs/refcoco.py with random ('scratch') encoders and a random batch of the
                paper's global batch (32) on the one device; model.dtype float32 and bfloat16,
                model.remat off (on only where the step does not fit): compile s, step s (median),
                images/s, peak device memory, FLOPs per step, MFU; the paper's schedule projected
                on 8 such GPUs beside its 58.4 h.
  inference     batch 1 forward of configs/refcoco.py at 480², frames/s beside table VI's 8.78.
  dynamic_conv  every form of benchmarks/dynamic_conv.py at the paper's shape, fwd and fwd+bwd;
                the form model.aligner.conv_impl='auto' should take on this backend.
  numerics      configs/tiny.py's logits and gradient norm, same parameters and batch, on the
                default device and on the host CPU, float32, at the default matmul precision and
                at 'highest'.
  lavt          the train-step figures of configs/lavt_refcoco.py.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (budget in seconds on a GPU, with --smoke on the CPU). On a GPU they add up to TOTAL_BUDGET,
# under 8 minutes with room for the start of this process; each job's own start (imports, the
# CUDA context: ~10-15 s) counts in its section's. The smoke budgets are wide: they only keep a
# stuck CPU run bounded on a loaded machine.
SECTIONS = {
    'paper': (185, 400),
    'inference': (60, 200),
    'dynamic_conv': (35, 120),
    'numerics': (65, 200),
    'lavt': (120, 400),
}
TOTAL_BUDGET = (465, 1320)

# The keys of each job's record: all of them are in the JSON, null where not measured (a GPU-only
# figure on the CPU: its *_reason says why; a stopped job: its status says so).
KEYS = {
    'train': ('machine', 'backend', 'device_kind', 'config', 'batch', 'dtype', 'remat',
              'lower_s', 'compile_s', 'xla_memory', 'device_bytes_limit', 'needs_remat',
              'step_s', 'steps_timed', 'images_per_s', 'loss', 'flops_per_step',
              'peak_device_bytes', 'peak_device_bytes_reason', 'peak_flops', 'peak_flops_kind',
              'achieved_flops_per_s', 'mfu', 'mfu_reason', 'projection'),
    'inference': ('machine', 'backend', 'device_kind', 'config', 'image_size', 'batch', 'runs',
                  'paper_fps'),
    'dynamic_conv': ('machine', 'backend', 'device_kind', 'shape', 'repeats', 'rows',
                     'fastest_fwd', 'fastest_fwd_bwd', 'model_forms', 'auto_resolves_to',
                     'recommended_auto_form', 'recommendation'),
    'numerics': ('machine', 'backend', 'device_kind', 'config', 'devices', 'batch', 'precisions'),
}

# section: [(run label, job kind, job arguments)]
JOBS = {
    'paper': [(d, 'train', ['--model=paper', f'--dtype={d}']) for d in ('float32', 'bfloat16')],
    'inference': [('forward', 'inference', [])],
    'dynamic_conv': [('forms', 'dynamic_conv', [])],
    'numerics': [('float32', 'numerics', [])],
    'lavt': [(d, 'train', ['--model=lavt', f'--dtype={d}']) for d in ('float32', 'bfloat16')],
}
# --smoke runs one dtype of each train section (the jobs' code is the same for both).
SMOKE_DTYPE = {'paper': 'float32', 'lavt': 'bfloat16'}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='folder for device_check.json and the logs')
  parser.add_argument('--smoke', action='store_true', help='every section on the CPU, small')
  parser.add_argument('--sections', default=','.join(SECTIONS), help='comma-separated, of: '
                      + ', '.join(SECTIONS))
  parser.add_argument('--budget', action='append', default=[], metavar='SECTION=SECONDS',
                      help="a section's time budget instead of its default")
  parser.add_argument('--total_budget', type=float, default=None, help='seconds for all of it')
  args = parser.parse_args(argv)
  args.sections = [s for s in args.sections.split(',') if s]
  unknown = set(args.sections) - set(SECTIONS)
  if unknown:
    parser.error(f'--sections: unknown {sorted(unknown)}; known: {list(SECTIONS)}')
  budgets = {name: b[1 if args.smoke else 0] for name, b in SECTIONS.items()}
  for item in args.budget:
    name, _, seconds = item.partition('=')
    if name not in SECTIONS or not seconds:
      parser.error(f'--budget={item}: expected SECTION=SECONDS with SECTION in {list(SECTIONS)}')
    budgets[name] = float(seconds)
  args.budgets = budgets
  if args.total_budget is None:
    args.total_budget = TOTAL_BUDGET[1 if args.smoke else 0]
  return args


def clean(x):
  """JSON-safe: NaN and infinities -> null (not invented numbers), tuples -> lists."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if isinstance(x, dict):
    return {str(k): clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [clean(v) for v in x]
  return x


def write_json(path, data):
  """Whole or not at all (a job killed while writing leaves the previous version)."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(clean(data), f, indent=1)
  os.replace(tmp, path)


def run_job(kind, job_args, smoke, timeout, out_dir, name):
  """One job in a process of its own, killed after `timeout` s -> (record, status, seconds)."""
  record_path = os.path.join(out_dir, 'jobs', f'{name}.json')
  log_path = os.path.join(out_dir, 'logs', f'{name}.log')
  if os.path.exists(record_path):
    os.remove(record_path)
  cmd = [sys.executable, '-m', 'benchmarks.device_jobs', kind, f'--out={record_path}'] + job_args
  if smoke:
    cmd.append('--smoke')
  env = dict(os.environ)
  # The job has the GPU alone: let XLA's allocator take more than its default 75% of it.
  env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')
  start = time.perf_counter()
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
      rc = proc.wait(timeout=max(timeout, 0.1))
      status = 'ok' if rc == 0 else f'failed (exit {rc}): {last_line(log_path)}'
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)   # the job and anything it started
      proc.wait()
      status = f'stopped: over its budget ({timeout:.0f} s left to it)'
  seconds = time.perf_counter() - start
  record = {k: None for k in KEYS[kind]}
  if os.path.exists(record_path):
    with open(record_path) as f:
      record.update(json.load(f))
  return record, status, seconds


def last_line(path):
  with open(path) as f:
    lines = [l.strip() for l in f if l.strip()]
  return lines[-1][:300] if lines else '(no output)'


def section_jobs(name, smoke):
  """The jobs a section runs: JOBS[name], with --smoke only SMOKE_DTYPE's of a train section."""
  return [job for job in JOBS[name]
          if not (smoke and name in SMOKE_DTYPE and job[0] != SMOKE_DTYPE[name])]


def run_section(name, args, deadline):
  """The section's jobs in turn within min(its budget, the total's rest) -> its record."""
  start = time.perf_counter()
  budget = max(0.0, min(args.budgets[name], deadline - start))
  section = {'status': 'ok', 'budget_s': budget, 'elapsed_s': None, 'runs': {}}
  queue = section_jobs(name, args.smoke)
  while queue:
    label, kind, job_args = queue.pop(0)
    left = start + budget - time.perf_counter()
    if left <= 0:
      record, status, seconds = {k: None for k in KEYS[kind]}, 'not run: budget spent', 0.0
    else:
      print(f'[{name}/{label}] running ({left:.0f} s left to the section)', flush=True)
      record, status, seconds = run_job(kind, job_args, args.smoke, left, args.out,
                                        f'{name}_{label}')
    record.update(status=status, seconds=seconds)
    section['runs'][label] = record
    print(f'[{name}/{label}] {status} after {seconds:.1f} s', flush=True)
    if status == 'ok' and record.get('needs_remat') and '--remat' not in job_args:
      queue.insert(0, (f'{label}_remat', kind, job_args + ['--remat']))   # memory asks for it
  statuses = [r['status'] for r in section['runs'].values()]
  if any(not s.startswith('ok') for s in statuses):
    section['status'] = 'stopped' if any(s.startswith(('stopped', 'not run')) for s in statuses) \
        else 'failed'
  section['elapsed_s'] = time.perf_counter() - start
  return section


# ------------------------------------------------------------------ the table


def gib(x):
  return '-' if x is None else f'{x / 2**30:.2f} GiB'


def num(x, fmt='.3g', unit=''):
  return '-' if x is None else f'{x:{fmt}}{unit}'


def figures(name, label, r):
  """-> [(figure, value)] of one run, for the table."""
  if r.get('status') != 'ok' and all(r.get(k) is None for k in KEYS.get(
      {'paper': 'train', 'lavt': 'train'}.get(name, name), ())):
    return []
  if name in ('paper', 'lavt'):
    rows = [('compile s (lower + compile)', num(None if r['compile_s'] is None
                                                else r['lower_s'] + r['compile_s'], '.1f')),
            ('step s (median)', num(r['step_s'], '.3f')),
            ('images/s', num(r['images_per_s'], '.1f')),
            ('peak device memory', gib(r['peak_device_bytes'])
             + (f" ({r['peak_device_bytes_reason']})" if r['peak_device_bytes_reason'] else '')),
            ("XLA's memory estimate", gib((r['xla_memory'] or {}).get('peak_estimate'))),
            ('TFLOP per step', num(None if r['flops_per_step'] is None
                                   else r['flops_per_step'] / 1e12, '.4g')),
            ('MFU', (f"{100 * r['mfu']:.1f}% of {r['peak_flops'] / 1e12:.0f} TFLOP/s "
                     f"({r['peak_flops_kind']})") if r['mfu'] is not None
             else '-' + (f" ({r['mfu_reason']})" if r['mfu_reason'] else ''))]
    if r['needs_remat'] and not r['remat']:
      estimate = gib((r['xla_memory'] or {}).get('peak_estimate'))
      rows.append(('needs remat', f"XLA's estimate {estimate} > the device's "
                   f"{gib(r['device_bytes_limit'])}: run again as {label}_remat"))
    p = r.get('projection')
    if p and p.get('hours') is not None:
      rows.append(('40 epochs on 8 such GPUs', f"{p['hours']:.1f} h (paper: "
                   f"{num(p['paper_hours'], '.1f', ' h')}; {p['assumption_short']})"))
    return rows
  if name == 'inference':
    return [(f'{dtype}: frames/s (compile s)', f"{num(run['fps'], '.2f')} "
             f"({num(run['compile_s'], '.1f')}); table VI: {num(r['paper_fps'], '.2f')}")
            for dtype, run in (r['runs'] or {}).items()]
  if name == 'dynamic_conv':
    rows = [(f"{row['form']}: fwd / fwd+bwd ms", f"{row['fwd_ms']:.3f} / {row['fwd_bwd_ms']:.3f}")
            for row in r['rows'] or []]
    if r['recommendation']:
      rows.append(("'auto' should take", r['recommendation']))
    return rows
  if name == 'numerics':
    rows = []
    for precision, p in (r['precisions'] or {}).items():
      rows.append((f'{precision}: logits max abs / rel diff',
                   f"{p['logits_max_abs_diff']:.3g} / {p['logits_rel_diff']:.3g}"))
      rows.append((f'{precision}: grad norm abs / rel diff',
                   f"{p['grad_norm_abs_diff']:.3g} / {p['grad_norm_rel_diff']:.3g}"))
    return rows
  return []


def print_table(out):
  print(f"\n{'section':<13} {'run':<15} {'figure':<34} value")
  for name, section in out['sections'].items():
    for label, r in section['runs'].items():
      print(f"{name:<13} {label:<15} {'status':<34} {r['status']} ({r['seconds']:.1f} s)")
      for figure, value in figures(name, label, r):
        print(f"{'':<13} {'':<15} {figure:<34} {value}")
  machine = next((r['machine'] for s in out['sections'].values() for r in s['runs'].values()
                  if r.get('machine')), None)
  smoke = ' (smoke: CPU, tiny sizes; no figure here is a GPU measurement)' if out['smoke'] else ''
  print(f"\n{machine or 'machine: (no job reported it)'}; total {out['elapsed_s']:.1f} s{smoke}")


def main(argv=None):
  args = parse_args(argv)
  for folder in ('jobs', 'logs'):
    os.makedirs(os.path.join(args.out, folder), exist_ok=True)
  start = time.perf_counter()
  deadline = start + args.total_budget
  out = {'smoke': args.smoke, 'argv': sys.argv[1:], 'budgets_s': args.budgets,
         'total_budget_s': args.total_budget, 'elapsed_s': None, 'sections': {}}
  path = os.path.join(args.out, 'device_check.json')
  for name in args.sections:
    out['sections'][name] = run_section(name, args, deadline)
    out['elapsed_s'] = time.perf_counter() - start
    write_json(path, out)
  print_table(out)
  print(f'written: {path}')


if __name__ == '__main__':
  main()
