"""Scaling-law sweeps: a grid of model sizes x token budgets, then fits and plots.

  python -m experiments.scaling --workdir=DIR --config=experiments/configs/scaling_cpu.py \
      [--shard=i/n] [--config.sweep.depths=2,4,6] [--config.data.path=...]
  python -m experiments.scaling --workdir=DIR --config=... --dry_run   # the grid and its FLOPs
  python -m experiments.scaling --workdir=DIR --config=... --dry_run --compile_for=v5e:4x4
                                                 # ... and each run's fit and time on a TPU slice
  python -m experiments.scaling --workdir=DIR                 # fit and plot DIR/runs.jsonl again
  python -m experiments.scaling --workdir=OUT --compare=DIR1,DIR2   # several sweeps, one figure

Every grid point is a normal training run (`train.loop.train_and_evaluate`) in DIR/runs/<name>/,
with num_steps set by its token budget, so its learning-rate schedule decays over its own budget
(Hoffmann et al. 2022 found a longer schedule overestimates the loss of shorter runs). The size
rule sets width and depth from one number, the depth: the block pattern is `sweep.pattern` with
{depth} filled in, d_model = sweep.aspect_ratio x its number of layers (rounded to a multiple of
sweep.head_dim), num_heads = d_model / head_dim, and the feed-forward keeps its ratio to d_model.
The grid is every depth x every budget in sweep.tokens, less the runs above sweep.max_flops: the
costly corner of large models on large budgets says little about the compute-optimal frontier,
while small models on large budgets are what brackets it (the IsoFLOP minima).

A finished run appends one row to DIR/runs.jsonl: the point (depth, d_model, pattern), N (non-
embedding parameters, `model.count_params`), D (tokens trained), C (its model FLOPs:
`training_flops_per_token` x D, which the fits use) and C_6ND (6 N D, Kaplan et al.'s estimate),
the final validation loss on the whole split, wall time and the run's config. Running the command
again skips rows that exist and resumes a run that was interrupted from its checkpoint;
`--shard=i/n` takes every n-th point from the i-th, so n processes (or hosts) share a grid. The
tokenizer and the tokenized corpus are prepared once, in DIR/corpus, and every run links to them:
all runs see the same tokens. When every point has its row, the fits (experiments/fits.py)
go to DIR/summary.json and the plots (experiments/plots.py) to DIR/scaling.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any

from absl import flags

from experiments.sweep import (RUNS_FILE, SweepError, append_run, parse_shard,  # noqa: F401
                               read_runs, run_grid)
from train import cli
from train.progress import say


SUMMARY_FILE = 'summary.json'
PLOT_FILE = 'scaling.png'
CORPUS_CONFIG = 'data.json'


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the grid: its name, the size rule's depth, its training config, its parameter
  counts (model.count_params), training FLOPs per token and tokens."""
  name: str
  depth: int
  config: Any
  counts: Any
  flops_per_token: float
  D: int

  @property
  def N(self) -> int:
    return self.counts.non_embedding

  @property
  def C(self) -> float:
    return self.flops_per_token * self.D


def size_rule(sweep, depth: int) -> dict:
  """The model fields that one depth sets: pattern, d_model, num_heads."""
  from model import ConfigError, registry
  if '{depth}' not in sweep.pattern:
    raise ConfigError(f'sweep.pattern={sweep.pattern!r} has no {{depth}}: write the repeat count '
                      f'that the size rule sets as {{depth}}, e.g. "attn*{{depth}}"')
  pattern = sweep.pattern.format(depth=depth)
  layers = len(registry.parse_pattern(pattern))
  d_model = sweep.head_dim * max(1, round(sweep.aspect_ratio * layers / sweep.head_dim))
  return dict(pattern=pattern, d_model=d_model, num_heads=d_model // sweep.head_dim)


def run_name(depth: int, tokens: int) -> str:
  return f'depth{depth}_tokens{tokens}'


def grid(config, vocab: int) -> list[Point]:
  """Every point of the grid whose training FLOPs are within sweep.max_flops, in order of
  depth, then budget. `vocab`: the models' vocabulary size (see `vocab_size`)."""
  import ml_collections
  from model import ConfigError, ModelConfig, count_params, training_flops_per_token
  sweep, tc, dc = config.sweep, config.train, config.data
  if config.model.d_ff is not None:
    raise ConfigError(f'model.d_ff={config.model.d_ff} would stay fixed while the sweep widens the '
                      f'model; leave it unset (4 x d_model) so the feed-forward scales too')
  tokens_per_step = tc.batch_size * dc.seq_len
  points = []
  for depth in sweep.depths:
    for tokens in sweep.tokens:
      steps = math.ceil(tokens / tokens_per_step)
      if steps <= tc.warmup_steps:
        raise ConfigError(f'sweep.tokens={tokens} is {steps} steps of {tokens_per_step} tokens, '
                          f'not more than train.warmup_steps={tc.warmup_steps}; raise the budget '
                          f'or lower the warmup')
      # Each run's config is the sweep's, less the grid: the loop reads every other section.
      c = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items() if k != 'sweep'})
      c.model.update(size_rule(sweep, depth))
      c.train.num_steps = steps
      model_cfg = ModelConfig.from_dict(dict(c.model.to_dict(), vocab_size=vocab))
      point = Point(run_name(depth, tokens), depth, c, count_params(model_cfg),
                    training_flops_per_token(model_cfg, dc.seq_len), steps * tokens_per_step)
      if not sweep.max_flops or point.C <= sweep.max_flops:
        points.append(point)
  if not points:
    raise ConfigError(f'sweep.max_flops={sweep.max_flops:.3g} leaves no run of the grid; raise it')
  return points


def prepare_corpus(config, workdir: str) -> str:
  """DIR/corpus: the tokenizer and tokenized splits every run of the sweep links to. Prepared in
  a private directory with its record (the data section it was made from) and renamed into
  place, so shards racing to prepare it agree on one; one of another data section is refused
  (experiments/stages.py check): the sweep's finished runs were trained on it."""
  from experiments import stages
  from train import workdir as workdir_lib
  corpus = os.path.join(workdir, 'corpus')
  stage = stages.Stage(workdir, 'corpus', {'data': config.data.to_dict()}, [corpus])
  if not os.path.exists(corpus):
    scratch = f'{corpus}.{os.getpid()}'
    workdir_lib.prepare_data(config, scratch)
    with open(os.path.join(scratch, CORPUS_CONFIG), 'w') as f:
      json.dump(stage.config, f)
    try:
      os.rename(scratch, corpus)
    except OSError:  # another shard got there first: use its corpus
      shutil.rmtree(scratch)
  with open(os.path.join(corpus, CORPUS_CONFIG)) as f:
    saved = json.load(f)
  saved = saved if 'data' in saved else {'data': saved}  # as written before the record had one
  stages.check(stage, {'config': saved}, f'{corpus} was prepared')
  return corpus


def link_corpus(corpus: str, run_dir: str) -> None:
  os.makedirs(run_dir, exist_ok=True)
  for item in ('tokenizer', 'data'):
    link = os.path.join(run_dir, item)
    if not os.path.lexists(link):
      os.symlink(os.path.relpath(os.path.join(corpus, item), run_dir), link)


def vocab_size(config, workdir: str) -> int:
  """The models' vocabulary: model.vocab_size, else the tokenizer's (a character vocabulary is
  known once the corpus is prepared)."""
  from train import tokenizers
  if config.model.vocab_size:
    return config.model.vocab_size
  if config.data.tokenizer == 'byte':
    return 256
  if config.data.tokenizer in ('bpe', 'unigram'):
    return config.data.vocab_size
  return tokenizers.load(os.path.join(prepare_corpus(config, workdir), 'tokenizer')).vocab_size


def plan(points: list[Point]) -> str:
  """The grid as a table: every run's size, tokens and training FLOPs, and their total."""
  lines = [f'{"run":<26} {"pattern":<16} {"d_model":>7} {"N":>13} {"D":>15} {"C":>9}']
  for p in points:
    lines.append(f'{p.name:<26} {p.config.model.pattern:<16} {p.config.model.d_model:>7} '
                 f'{p.N:>13,} {p.D:>15,} {p.C:>9.3g}')
  lines.append(f'{len(points)} runs, {sum(p.C for p in points):.3g} training FLOPs in all '
               f'(C = model.training_flops_per_token x D; the final evaluations add a little)')
  return '\n'.join(lines)


def result_row(point: Point, final: dict) -> dict:
  """The runs.jsonl row of a finished run."""
  c = point.config
  return dict(name=point.name, depth=point.depth, pattern=c.model.pattern,
              d_model=c.model.d_model, N=point.N, N_total=point.counts.total,
              N_active=point.counts.active_non_embedding, D=point.D, C=point.C,
              C_6ND=6.0 * point.N * point.D, flops_per_token=point.flops_per_token,
              loss=final['val_loss'], val_bits_per_char=final['val_bits_per_char'],
              steps=final['step'], wall_s=final['wall_s'], compile_s=final['compile_s'],
              config=c.to_dict())


def sweep(config, workdir: str, shard: tuple[int, int] = (0, 1),
          num_bootstrap: int = 100) -> dict[str, dict]:
  """Runs this shard's unfinished grid points; fits and plots once the whole grid is done.
  Returns the rows of runs.jsonl by name."""
  import jax
  from train import loop, perf
  os.makedirs(workdir, exist_ok=True)
  corpus = prepare_corpus(config, workdir)
  points = grid(config, vocab_size(config, workdir))

  def before(todo):
    say(plan(todo))
    # Measured once for the sweep, not at the start of every run.
    config.train.peak_flops = perf.peak_flops_per_s(config.model.dtype, config.train.peak_flops)

  def run(p, run_dir):
    link_corpus(corpus, run_dir)
    p.config.train.peak_flops = config.train.peak_flops
    return result_row(p, loop.train_and_evaluate(p.config, run_dir))

  done, missing = run_grid(points, workdir, shard, run, before=before, describe=lambda p: (
      f'pattern {p.config.model.pattern}, d_model {p.config.model.d_model}, '
      f'{p.config.train.num_steps} steps'))
  chief = jax.process_index() == 0
  if missing:
    say(f'sweep: {len(missing)} of {len(points)} runs still to finish (other shards?); once they '
        f'are, fit and plot with: python -m experiments.scaling --workdir={workdir}')
  elif chief:
    analyze(workdir, num_bootstrap)
  return done


def analyze(workdir: str, num_bootstrap: int = 100) -> dict:
  """Fits every law to DIR/runs.jsonl -> DIR/summary.json, and plots them -> DIR/scaling.png."""
  from experiments.scaling import fits, plots
  runs = list(read_runs(workdir).values())
  if not runs:
    raise SweepError(f'{os.path.join(workdir, RUNS_FILE)} holds no runs; run a sweep there first '
                     f'(--config=experiments/configs/scaling_cpu.py)')
  start = time.time()
  summary = fits.summarize(runs, num_bootstrap)
  summary['total_run_wall_s'] = sum(r['wall_s'] for r in runs)
  with open(os.path.join(workdir, SUMMARY_FILE), 'w') as f:
    json.dump(summary, f, indent=1)
  plots.plot_sweep(runs, summary, os.path.join(workdir, PLOT_FILE))
  print(fits.describe(summary))
  print(f'fits and plots in {time.time() - start:.0f}s: {os.path.join(workdir, SUMMARY_FILE)}, '
        f'{os.path.join(workdir, PLOT_FILE)}')
  return summary


def compare(workdirs: list[str], out: str, num_bootstrap: int = 100) -> str:
  """One figure of several sweeps' laws, OUT/compare.png; a sweep without summary.json is fitted
  first."""
  from experiments.scaling import plots
  sweeps = []
  for d in workdirs:
    path = os.path.join(d, SUMMARY_FILE)
    if os.path.exists(path):
      with open(path) as f:
        summary = json.load(f)
    else:
      summary = analyze(d, num_bootstrap)
    sweeps.append((os.path.basename(os.path.normpath(d)), list(read_runs(d).values()), summary))
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, 'compare.png')
  plots.plot_compare(sweeps, path)
  print(f'{len(sweeps)} sweeps compared: {path}')
  return path


def main(argv):
  del argv
  f = flags.FLAGS
  if f.compile_for and not f.dry_run:
    raise SweepError('--compile_for checks the grid without training: add --dry_run')
  if f.compare:
    compare(f.compare, f.workdir, f.bootstrap)
  elif f.config is None:
    analyze(f.workdir, f.bootstrap)
  elif f.dry_run:
    vocab = vocab_size(f.config, f.workdir)
    points = grid(f.config, vocab)
    say(plan(points))
    if f.compile_for:
      from train.compile_for import check_runs
      check_runs([(p.name, p.config) for p in points], f.compile_for, vocab,
                 os.path.join(f.workdir, f'compile_{f.compile_for.replace(":", "_")}.json'))

  else:
    sweep(f.config, f.workdir, parse_shard(f.shard), f.bootstrap)


if __name__ == '__main__':
  flags.DEFINE_string('shard', '0/1', 'i/n: run every n-th grid point starting from the i-th.')
  flags.DEFINE_list('compare', [], 'Sweep directories to compare on one figure in --workdir.')
  flags.DEFINE_integer('bootstrap', 100, 'Bootstrap resamples for the fits\' intervals.')
  flags.DEFINE_bool('dry_run', False, 'Print the grid (N, D, FLOPs of every run) and stop.')
  flags.DEFINE_string('compile_for', None, 'With --dry_run: compile every run for this TPU slice '
                      '(e.g. v5e:4x4; needs libtpu) and report whether it fits and its estimated '
                      'time (train/compile_for.py, docs/tpu.md).')
  # Without --config (experiments/configs/scaling_*.py) the sweep in --workdir is fitted and
  # plotted again.
  cli.command(main, 'Sweep directory: runs/, runs.jsonl, summary.json, plots.',
              makes='experiment', errors=(SweepError,))
