"""Length extrapolation: which positional scheme reads past the length it was trained at.

  python -m experiments.extrapolation --workdir=runs/extrapolation
  python -m experiments.extrapolation --workdir=DIR --config.sweep.schemes=rope,alibi
  python -m experiments.extrapolation --workdir=DIR --plot_only     # summary.json -> plot again

One model per scheme of `sweep.schemes` (`rope`, `alibi`, `sinusoidal`, `learned`, `none`: the
attention model with that `model.position`; `mamba`: the same width of Mamba layers), each a
normal training run (`train.loop.train_and_evaluate`) in DIR/runs/<scheme>/ at `data.seq_len`
tokens. Each is then evaluated on the validation split cut into windows of every length L of
`sweep.lengths` (Press et al. 2022's measure: the mean loss over the L tokens of a window, every
window read whole, eval/loss.py), and RoPE again with each of `sweep.rope_scalings` at factor
s = L / seq_len (model/positions.py: rope_frequencies). A learned table stops at its
`model.max_len`: longer lengths are recorded as null.

Writes into the work directory:
  runs/<scheme>/     each run (config, checkpoint, metrics.jsonl) and its results,
                     extrapolation.json; a scheme is trained (and evaluated) again only when
                     its config changed (experiments/stages.py; records in stages/)
  summary.json       per scheme: loss at each length, loss by position (bucketed) at the longest,
                     training wall time; per RoPE scaling: loss at each length; the wall times
  extrapolation.png  loss against evaluation length, one line per scheme (Press et al.'s
                     Figure 1), and loss by position at the longest length
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
from absl import flags

from train import cli

ATTENTION_SCHEMES = ('rope', 'alibi', 'sinusoidal', 'learned', 'none')
SCHEMES = ATTENTION_SCHEMES + ('mamba',)
RESULT_FILE = 'extrapolation.json'
BUCKET = 32   # positions per bucket of the loss-by-position curve


def check_config(config) -> None:
  from model.config import ConfigError
  sweep = config.sweep
  unknown = sorted(set(sweep.schemes) - set(SCHEMES))
  if unknown or not sweep.schemes:
    raise ConfigError(f'sweep.schemes has {unknown or "nothing"}; choose from {list(SCHEMES)}')
  lengths = list(sweep.lengths)
  if not lengths or lengths[0] != config.data.seq_len or lengths != sorted(set(lengths)):
    raise ConfigError(f'sweep.lengths={tuple(lengths)} must rise from the training length '
                      f'data.seq_len={config.data.seq_len}')
  unknown = sorted(set(sweep.rope_scalings) - {'linear', 'ntk', 'yarn'})
  if unknown:
    raise ConfigError(f'sweep.rope_scalings has {unknown}; choose from linear, ntk, yarn')
  if sweep.eval_tokens < 0:
    raise ConfigError(f'sweep.eval_tokens must be >= 0 (0: the whole split), got '
                      f'{sweep.eval_tokens}')


def scheme_config(config, scheme: str) -> ml_collections.ConfigDict:
  """The training config of one scheme: the shared one with its position (or Mamba blocks)."""
  c = ml_collections.ConfigDict(config.to_dict())
  del c['sweep']
  if scheme == 'mamba':
    c.model.update(pattern=config.sweep.mamba_pattern, position='none')
    c.model.mamba.scan_impl = config.sweep.mamba_scan_impl
  else:
    c.model.position = scheme
  if c.model.position == 'learned':
    c.model.max_len = config.data.seq_len  # the table holds exactly the trained positions
  return c


def losses_by_length(model, params, tokens, lengths, batch_tokens: int, eval_tokens: int,
                     label: str) -> tuple[dict, list]:
  """{L: mean loss over windows of L tokens} and the loss by position (bucketed) at the longest
  L; null where the model cannot read L tokens (a learned table)."""
  from eval import loss as loss_lib
  from model.config import ConfigError
  out, curve = {}, []
  for n in lengths:
    try:
      loss_lib.check_length(model.config, n)
    except ConfigError:
      out[str(n)] = None
      continue
    batch = max(1, batch_tokens // n)
    max_batches = -(-eval_tokens // (batch * n)) if eval_tokens else -1
    loss_L, weight_L = loss_lib.loss_by_position(model, params, tokens, n, batch, max_batches,
                                                 f'{label}: loss at length {n}')
    out[str(n)] = loss_lib.mean_over_prefixes(loss_L, weight_L, [n])[n]
    curve = loss_lib.buckets(loss_L, weight_L, BUCKET)
  return out, curve


def run_scheme(config, scheme: str, workdir: str) -> dict:
  """Trains and evaluates one scheme, each unless done from the same config (experiments/
  stages.py); returns its results, also in DIR/runs/<scheme>/extrapolation.json."""
  from experiments import stages
  from train import loop
  from train.progress import say
  run_dir = os.path.join(workdir, 'runs', scheme)

  def train(out):
    say(f'{scheme}: training in {out}')
    start = time.time()
    final = loop.train_and_evaluate(scheme_config(config, scheme), out)
    return {'val_loss': final['val_loss'], 'train_s': time.time() - start}

  trained = stages.run(stages.Stage(workdir, scheme, scheme_config(config, scheme).to_dict(),
                                    [run_dir]), train, in_place=True)
  settings = {'sweep': {k: v for k, v in config.sweep.to_dict().items() if k != 'schemes'},
              'eval_batch_size': config.train.eval_batch_size}
  path = os.path.join(run_dir, RESULT_FILE)
  stages.run(stages.Stage(workdir, f'{scheme}_eval', settings, [path], [trained]),
             lambda out: evaluate_scheme(config, scheme, run_dir, trained['result'], out))
  with open(path) as f:
    return json.load(f)


def evaluate_scheme(config, scheme: str, run_dir: str, trained: dict, path: str) -> None:
  """Writes the trained run's losses at every length (and RoPE's with each scaling) to `path`;
  `trained`: its final validation loss and training time."""
  from train.restore import load_run
  from model import LM, count_params
  from train.progress import say
  run = load_run(run_dir)
  tokens = run.objective.data(run_dir, None).validation.tokens
  sweep, seq_len = config.sweep, config.data.seq_len
  batch_tokens = config.train.eval_batch_size * seq_len
  start = time.time()
  by_length, curve = losses_by_length(run.model, run.params, tokens, sweep.lengths, batch_tokens,
                                      sweep.eval_tokens, scheme)
  result = {'loss_by_length': by_length, 'loss_by_position_buckets': curve,
            'val_loss_whole_split': trained['val_loss'], 'train_s': trained['train_s'],
            'params': count_params(run.model_cfg).total}
  if scheme == 'rope':
    result['rope_scaled'] = {}
    for scaling in sweep.rope_scalings:
      result['rope_scaled'][scaling] = {'loss_by_length': {}}
      for n in sweep.lengths[1:]:
        cfg = run.model_cfg.replace(rope_scaling=scaling, rope_factor=n / seq_len,
                                    rope_original_len=seq_len)
        scaled, _ = losses_by_length(LM(cfg), run.params, tokens, [n], batch_tokens,
                                     sweep.eval_tokens, f'rope + {scaling}')
        result['rope_scaled'][scaling]['loss_by_length'][str(n)] = scaled[str(n)]
  result['eval_s'] = time.time() - start
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  say(f'{scheme}: ' + '  '.join(f'L={n} {v:.3f}' if v is not None else f'L={n} -'
                                 for n, v in by_length.items()))


def summarize(config, results: dict, wall_s: float) -> dict:
  rope = results.get('rope', {})
  return {'trained_len': config.data.seq_len, 'max_len': max(config.sweep.lengths),
          'lengths': list(config.sweep.lengths), 'eval_tokens': config.sweep.eval_tokens,
          'schemes': {k: {f: v for f, v in r.items() if f != 'rope_scaled'}
                      for k, r in results.items()},
          'rope_scaled': rope.get('rope_scaled', {}), 'wall_s': wall_s}


def main(argv):
  del argv
  from experiments.extrapolation import plots
  from train.progress import say
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  summary_path = os.path.join(workdir, 'summary.json')
  if flags.FLAGS.plot_only:
    with open(summary_path) as f:
      summary = json.load(f)
  else:
    check_config(config)
    start = time.time()
    results = {scheme: run_scheme(config, scheme, workdir) for scheme in config.sweep.schemes}
    summary = summarize(config, results, time.time() - start)
    with open(summary_path, 'w') as f:
      json.dump(summary, f, indent=1)
  plots.plot(summary, os.path.join(workdir, 'extrapolation.png'))
  lengths = summary['lengths']
  rows = {**{k: r['loss_by_length'] for k, r in summary['schemes'].items()},
          **{f'rope+{k}': r['loss_by_length'] for k, r in summary['rope_scaled'].items()}}
  say('loss at length  ' + ''.join(f'{n:>8}' for n in lengths))
  for name, row in rows.items():
    say(f'{name:<15}  ' + ''.join(
        f'{row[str(n)]:>8.3f}' if row.get(str(n)) is not None else f'{"-":>8}' for n in lengths))
  say(f'done: {summary_path}, {os.path.join(workdir, "extrapolation.png")}, wall '
      f'{summary["wall_s"]:.0f}s')


def define_flags() -> None:
  flags.DEFINE_bool('plot_only', False, 'Draw the plot again from DIR/summary.json.')


if __name__ == '__main__':
  define_flags()
  cli.command(main, 'Work directory: the runs, summary.json and the plot.',
              config='extrapolation.py', makes='experiment')
