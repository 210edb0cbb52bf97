"""What each architecture can recall: MQAR (or selective copying) across patterns x widths x
difficulties, in the style of Zoology's figure (Arora et al. 2023).

  python -m experiments.recall --workdir=DIR [--config=experiments/configs/recall.py] [--shard=i/n]
  python -m experiments.recall --workdir=DIR --config.sweep.patterns="('attn*2','mamba2*2')"
  python -m experiments.recall --workdir=DIR --analyze_only      # summary and plots again

The grid is every block pattern of `sweep.patterns` x every width of `sweep.widths` x every
difficulty (`sweep.num_pairs` x `sweep.seq_lens`: MQAR's key-value pairs, or selective copying's
tokens, and the row length). Each point is a normal training run (`train.loop.train_and_evaluate`
with the answer-only `recall` objective, experiments/recall/objective.py) in DIR/runs/<name>, and
appends one row to DIR/runs.jsonl: the point, its accuracy on the held-out answers, its
parameters (`model.count_params`), the state size of its recurrent mixers, and its wall time. The
grid driver is the scaling sweep's (experiments/sweep.py): re-running skips finished runs and
resumes an interrupted one; `--shard=i/n` splits the grid. Once every row is in:
  summary.json   for each pattern and difficulty, the smallest width reaching sweep.target
                 accuracy (null if none did), and the accuracies by width
  recall.png     accuracy against width, one panel per difficulty, one line per pattern
  state.png      accuracy against recurrent state size, for the patterns with a recurrent mixer
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from absl import flags

from experiments.sweep import RUNS_FILE, SweepError, parse_shard, read_runs, run_grid
from train import cli
from train.progress import say

SUMMARY_FILE = 'summary.json'


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the grid: the pattern, width and difficulty, and its training config."""
  name: str
  pattern: str
  d_model: int
  num_pairs: int
  seq_len: int
  config: Any


def run_name(pattern: str, d_model: int, num_pairs: int, seq_len: int) -> str:
  safe = pattern.replace('*', 'x').replace(',', '+').replace(':', '-')
  return f'{safe}_d{d_model}_n{num_pairs}_l{seq_len}'


def grid(config) -> list[Point]:
  """Every pattern x width x (num_pairs, seq_len), in that order; each run's config is the
  sweep's less the grid, with the model and task fields the point sets."""
  import ml_collections
  from experiments.recall import tasks
  from model import ConfigError
  sweep = config.sweep
  points = []
  for pattern in sweep.patterns:
    for d_model in sweep.widths:
      if d_model % sweep.head_dim:
        raise ConfigError(f'sweep.widths: {d_model} is not a multiple of sweep.head_dim='
                          f'{sweep.head_dim}')
      for seq_len in sweep.seq_lens:
        for num_pairs in sweep.num_pairs:
          c = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items()
                                         if k != 'sweep'})
          c.model.update(pattern=pattern, d_model=d_model, num_heads=d_model // sweep.head_dim,
                         d_ff=None)
          c.task.update(seq_len=seq_len, **{'num_pairs' if c.task.name == 'mqar'
                                            else 'num_tokens': num_pairs})
          c.data.seq_len = seq_len
          t = c.task  # checked here, before the first run starts
          tasks.check_task(t.name, t.vocab, seq_len, tasks.num_items(t),
                           t.num_queries or tasks.num_items(t))
          points.append(Point(run_name(pattern, d_model, num_pairs, seq_len), pattern, d_model,
                              num_pairs, seq_len, c))
  return points


def state_size(model_cfg) -> int:
  """Numbers a recurrent mixer carries from one token to the next, summed over layers (0 for
  attention, whose cache grows with the context): Mamba's and Mamba-2's Din x N state plus their
  convolutions' last d_conv - 1 inputs; other mixers by their `state_size(config)` when they
  define one."""
  from model import registry
  total = 0
  for mixer, _ in registry.parse_pattern(model_cfg.pattern):
    cls = registry.MIXERS[mixer].module
    if hasattr(cls, 'state_size'):
      total += cls.state_size(model_cfg)
    elif mixer == 'mamba':
      m = model_cfg.mamba
      d_inner = m.expand * model_cfg.d_model
      total += d_inner * m.d_state + d_inner * (m.d_conv - 1)
    elif mixer == 'mamba2':  # H x P x N = Din x N, and the conv's inputs: x, B and C
      m = model_cfg.mamba2
      d_inner = m.expand * model_cfg.d_model
      total += d_inner * m.d_state + (d_inner + 2 * m.n_groups * m.d_state) * (m.d_conv - 1)
  return total


def result_row(point: Point, final: dict, model_cfg) -> dict:
  from model import count_params
  counts = count_params(model_cfg)
  return dict(name=point.name, pattern=point.pattern, d_model=point.d_model,
              num_pairs=point.num_pairs, seq_len=point.seq_len, task=point.config.task.name,
              accuracy=final['val_accuracy'], loss=final['val_loss'],
              answers=final['val_answers'], params=counts.total,
              params_non_embedding=counts.non_embedding, state_size=state_size(model_cfg),
              steps=final['step'], wall_s=final['wall_s'], cpu_s=final.get('cpu_s'),
              compile_s=final['compile_s'], config=point.config.to_dict())


def sweep(config, workdir: str, shard: tuple[int, int] = (0, 1)) -> dict[str, dict]:
  """Runs this shard's unfinished points; summarises and plots once the grid is complete."""
  import jax
  from model import ModelConfig
  from train import loop, perf
  points = grid(config)

  def before(todo):
    config.train.peak_flops = perf.peak_flops_per_s(config.model.dtype, config.train.peak_flops)

  def run(p, run_dir):
    p.config.train.peak_flops = config.train.peak_flops
    cpu = time.process_time()
    final = loop.train_and_evaluate(p.config, run_dir)
    final['cpu_s'] = time.process_time() - cpu  # on a shared machine, steadier than wall time
    model_cfg = ModelConfig.from_dict(dict(p.config.model.to_dict(),
                                           vocab_size=p.config.task.vocab))
    return result_row(p, final, model_cfg)

  done, missing = run_grid(points, workdir, shard, run, before=before, describe=lambda p: (
      f'pattern {p.pattern}, d_model {p.d_model}, {p.num_pairs} pairs, seq_len {p.seq_len}'))
  if missing:
    say(f'sweep: {len(missing)} of {len(points)} runs still to finish (other shards?); once they '
        f'are, summarise with: python -m experiments.recall --workdir={workdir} --analyze_only')
  elif jax.process_index() == 0:
    analyze(workdir, config.sweep.target)
  return done


def summarize(runs: list[dict], target: float) -> dict:
  """For each pattern and difficulty: accuracy by width and the smallest width reaching
  `target` (None if none did)."""
  out = {}
  for r in sorted(runs, key=lambda r: (r['pattern'], r['num_pairs'], r['seq_len'], r['d_model'])):
    key = f'pairs{r["num_pairs"]}_len{r["seq_len"]}'
    entry = out.setdefault(r['pattern'], {}).setdefault(
        key, dict(num_pairs=r['num_pairs'], seq_len=r['seq_len'], accuracy={},
                  smallest_width=None))
    entry['accuracy'][str(r['d_model'])] = r['accuracy']
    if r['accuracy'] >= target and entry['smallest_width'] is None:
      entry['smallest_width'] = r['d_model']
  return dict(target=target, num_runs=len(runs),
              total_run_wall_s=sum(r['wall_s'] for r in runs),
              total_run_cpu_s=sum(r.get('cpu_s') or 0.0 for r in runs), patterns=out)


def table(summary: dict) -> str:
  """A markdown table: a row per pattern, a column per difficulty, the smallest solving width."""
  keys = sorted({k for p in summary['patterns'].values() for k in p},
                key=lambda k: tuple(int(x) for x in k.replace('pairs', '').split('_len')))
  lines = ['| pattern | ' + ' | '.join(keys) + ' |', '| --- |' + ' --- |' * len(keys)]
  for pattern, by_key in summary['patterns'].items():
    cells = []
    for k in keys:
      e = by_key.get(k)
      if e is None:
        cells.append('')
        continue
      best = max(e['accuracy'].values())
      cells.append(str(e['smallest_width']) if e['smallest_width'] is not None
                   else f'none (best {best:.2f})')
    lines.append(f'| {pattern} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def analyze(workdir: str, target: float = 0.99) -> dict:
  from experiments.recall import plots
  runs = list(read_runs(workdir).values())
  if not runs:
    raise SweepError(f'{os.path.join(workdir, RUNS_FILE)} holds no runs; run the sweep there '
                     f'first (python -m experiments.recall --workdir={workdir})')
  summary = summarize(runs, target)
  with open(os.path.join(workdir, SUMMARY_FILE), 'w') as f:
    json.dump(summary, f, indent=1)
  paths = plots.plot_recall(runs, target, workdir)
  print(f'smallest d_model reaching {target:.0%} accuracy:\n{table(summary)}')
  print(f'written: {os.path.join(workdir, SUMMARY_FILE)}, {", ".join(paths)}')
  return summary


def main(argv):
  del argv
  f = flags.FLAGS
  if f.analyze_only:
    analyze(f.workdir, f.config.sweep.target)
  else:
    sweep(f.config, f.workdir, parse_shard(f.shard))


if __name__ == '__main__':
  flags.DEFINE_string('shard', '0/1', 'i/n: run every n-th grid point starting from the i-th.')
  flags.DEFINE_bool('analyze_only', False, 'Summarise and plot DIR/runs.jsonl without training.')
  cli.command(main, 'Sweep directory: runs/, runs.jsonl, summary.json, plots.',
              config='recall.py', makes='experiment', errors=(SweepError,))
