"""python -m experiments.benchmark.tpu --workdir=DIR [--config=experiments/configs/benchmark_tpu.py]

Compiles each run of the config for its TPU slice on this machine (train/compile_for.py: libtpu,
no TPU needed) and prints one table: memory per chip against the chip's HBM, whether it fits, the
compiled matmul FLOPs against the model's count, the roofline estimate of step time and MFU (an
estimate, not a measurement), and the collectives of a train step. Writes DIR/benchmark_tpu.json
(every run's full report, as `python -m train --compile_for` writes compile.json).
"""

from __future__ import annotations

import json
import os

from absl import flags

from train import cli

RESULTS_FILE = 'benchmark_tpu.json'


def run_config(case, steps_per_call: int):
  """The training config of one case: base defaults plus the shape, batch and mesh."""
  from experiments.configs import base, benchmark
  shape = benchmark.get_config().catalog[case.shape]
  c = base.get_config()
  c.model = shape.model
  c.model.attention_impl = 'xla'  # the catalog's GPU shapes ask for cuDNN
  c.data.seq_len = shape.seq_len
  c.train.update(batch_size=case.batch_size, eval_batch_size=case.batch_size,
                 steps_per_call=steps_per_call)
  c.mesh.update(case.mesh.to_dict())
  return c


def row(name: str, case, report: dict) -> dict:
  train = report['programs']['train']
  memory, estimate = train['memory'], report.get('estimate') or {}
  steps = report['steps_per_call']
  return dict(
      name=name, shape=case.shape, topology=report['topology'],
      mesh=' x '.join(f'{k}={v}' for k, v in report['mesh'].items() if v > 1),
      batch=f'{report["batch_size"]} x {report["seq_len"]}', gib=(memory['total'] or 0) / 2**30,
      hbm_gib=memory['hbm'] / 2**30, fits=memory['fits'],
      flops_ratio=(estimate['compiled_flops_per_step'] / estimate['model_flops_per_step']
                   if estimate else None),
      step_ms=1e3 * estimate['step_s'] if estimate else None,
      mfu=estimate.get('mfu'), memory_bound=estimate.get('memory_bound_fraction'),
      collectives={k: dict(per_step=c['runs'] / steps, mib=c['bytes'] / steps / 2**20)
                   for k, c in train.get('collectives', {}).items()},
      compile_s=train['compile_s'])


def format_table(rows: list[dict]) -> str:
  short = {'all-gather': 'AG', 'all-reduce': 'AR', 'reduce-scatter': 'RS', 'all-to-all': 'A2A',
           'collective-permute': 'CP'}
  lines = [f'{"run":<22}{"topology":<11}{"mesh":<20}{"batch":<11}{"GiB/chip":>14}  {"fits":<5}'
           f'{"FLOPs":>6}{"ms/step":>9}{"MFU":>6}{"mem":>5}  collectives per step (n, MiB)'
           f'{"compile s":>12}']
  for r in rows:
    est = (f'{r["flops_ratio"]:>5.2f}x{r["step_ms"]:>9.3g}{100 * r["mfu"]:>5.0f}%'
           f'{100 * r["memory_bound"]:>4.0f}%' if r['step_ms'] else f'{"":>26}')
    found = ', '.join(f'{short[k]} {c["per_step"]:.0f} {c["mib"]:,.0f}'
                      for k, c in r['collectives'].items()) or '-'
    lines.append(f'{r["name"]:<22}{r["topology"]:<11}{r["mesh"]:<20}{r["batch"]:<11}'
                 f'{r["gib"]:>6.2f} / {r["hbm_gib"]:>5.2f}  {"yes" if r["fits"] else "NO":<5}'
                 f'{est}  {found:<30}{r["compile_s"]:>10.0f}')
  lines.append('GiB/chip: the train call\'s peak plus code against the HBM the compiler may use; '
               'FLOPs: compiled matmul FLOPs / the model\'s count; ms/step, MFU and mem (the '
               'memory-bound share): the roofline estimate, not a measurement')
  return '\n'.join(lines)


def main(argv):
  del argv
  from train.compile_for import compile_run
  c, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  names = [n for n in (c.cases or ','.join(c.catalog)).split(',') if n]
  unknown = [n for n in names if n not in c.catalog]
  if unknown:
    from model.config import ConfigError
    raise ConfigError(f'config.cases: unknown case(s) {unknown}; the catalog has '
                      f'{sorted(c.catalog)}')
  os.makedirs(workdir, exist_ok=True)
  reports, rows = {}, []
  for name in names:
    case = c.catalog[name]
    reports[name] = compile_run(run_config(case, c.steps_per_call), case.topology,
                                programs=('train',))
    rows.append(row(name, case, reports[name]))
    print(format_table(rows[-1:]).splitlines()[1], flush=True)
    with open(os.path.join(workdir, RESULTS_FILE), 'w') as f:  # after each case: they are slow
      json.dump({'rows': rows, 'reports': reports}, f, indent=1)
  print(format_table(rows))


if __name__ == '__main__':
  cli.command(main, 'Where benchmark_tpu.json is written.', config='benchmark_tpu.py',
              makes='experiment')
