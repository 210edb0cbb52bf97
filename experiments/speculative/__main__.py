"""Speculative decoding's speed-up on a CPU: a large target, a much smaller draft, K = 1..8.

    python -m experiments.speculative --workdir=runs/speculative       # train both, then measure
    python -m experiments.speculative --workdir=DIR --target=T --draft=D  # measure trained runs

Trains the target and the draft of `config.target` / `config.draft` on tiny shakespeare through
the one loop (train.loop.train_and_evaluate, in DIR/target and DIR/draft; a finished run is
reused), unless --target and --draft name trained runs (same tokenizer). Then, at every
temperature of config.bench, times the target alone (model.decode.generate, batch 1) and
speculative decoding (model.speculative.speculative_generate) for every K of bench.num_draft, each
generating bench.max_new_tokens tokens from the same prompt: medians of bench.repeats runs after
compiling, with the target alone timed again beside each K (alternating with it), so that each
speed-up is the ratio of two timings taken together, which a loaded machine's drift spares.

Writes into the work directory:
  bench.jsonl        one row per (temperature, K or 'target'): seconds, tokens/s, drafted,
                     accepted
  summary.json       {"speedup": {K: ...}, "acceptance": {K: ...}} at temperature 0, the same
                     per temperature under "temperatures", the models' sizes and validation losses
  speculative.png    speed-up and acceptance rate against K, one line per temperature
"""

from __future__ import annotations

import json
import os
import time

from absl import flags

from train import cli
from train.progress import say



def train_models(config, workdir: str) -> dict[str, str]:
  """Trains (or finds finished) the target and the draft: their work directories."""
  import ml_collections

  from train.loop import train_and_evaluate
  dirs = {}
  for name in ('target', 'draft'):
    c = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items()
                                   if k not in ('target', 'draft', 'bench')})
    c.model.update(config[name].model.to_dict())
    c.train.num_steps = config[name].num_steps
    run_dir = os.path.join(workdir, name)
    say(f'training the {name}: {c.model.pattern}, d_model {c.model.d_model}, '
        f'{c.train.num_steps} steps, in {run_dir}')
    train_and_evaluate(c, run_dir)
    dirs[name] = run_dir
  return dirs


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def measure(target_run, draft_run, bench, on_row) -> list[dict]:
  """The rows of bench.jsonl: target alone and speculative for each K, per temperature."""
  import jax
  import jax.numpy as jnp

  from model.decode import Sampling, generate
  from model.speculative import speculative_generate
  from model.config import check_context
  prompt = jnp.asarray(target_run.tokenizer.encode(bench.prompt), jnp.int32)[None]
  total = prompt.shape[1] + bench.max_new_tokens
  models = []
  for run in (target_run, draft_run):
    check_context(run.model_cfg, total + max(bench.num_draft), 'the prompt plus max_new_tokens')
    context = run.config.data.seq_len
    model = run.model
    if total > context and not run.model_cfg.attention_window:  # as eval.sample does
      model = type(model)(run.model_cfg.replace(attention_window=context))
    models.append(model)
  target, draft = models
  rows = []
  for temperature in bench.temperatures:
    sampling = Sampling(temperature=float(temperature))
    rng = jax.random.key(bench.seed)
    alone = jax.jit(lambda p, r, s=sampling: generate(
        target, p, prompt, r, max_new_tokens=bench.max_new_tokens, sampling=s)[0])
    run_alone = lambda: jax.block_until_ready(alone(target_run.params, rng))
    run_alone()
    base = dict(temperature=temperature, num_draft=0,
                seconds=_median_seconds(run_alone, bench.repeats))
    base['tokens_per_s'] = bench.max_new_tokens / base['seconds']
    on_row(base)
    rows.append(base)
    for k in bench.num_draft:
      spec = jax.jit(lambda tp, dp, r, s=sampling, k=k: speculative_generate(
          target, tp, draft, dp, prompt, r, max_new_tokens=bench.max_new_tokens, num_draft=k,
          sampling=s))
      run_spec = lambda spec=spec: jax.block_until_ready(
          spec(target_run.params, draft_run.params, rng))
      _, _, drafted, accepted = run_spec()
      # The target alone is timed again beside each K, alternating with it: on a shared machine
      # the load drifts, and the ratio of two timings taken together is what stays comparable.
      alone_s, spec_s = [], []
      for _ in range(bench.repeats):
        alone_s.append(_median_seconds(run_alone, 1))
        spec_s.append(_median_seconds(run_spec, 1))
      seconds = sorted(spec_s)[len(spec_s) // 2]
      alone_seconds = sorted(alone_s)[len(alone_s) // 2]
      row = dict(temperature=temperature, num_draft=k, seconds=seconds,
                 tokens_per_s=bench.max_new_tokens / seconds,
                 target_alone_tokens_per_s=bench.max_new_tokens / alone_seconds,
                 drafted=int(drafted), accepted=int(accepted),
                 acceptance=int(accepted) / int(drafted), speedup=alone_seconds / seconds)
      rows.append(row)
      on_row(row)
  return rows


def summarize(rows, target_run, draft_run) -> dict:
  from model import count_params
  by_temperature = {}
  for row in rows:
    t = by_temperature.setdefault(str(row['temperature']), {'speedup': {}, 'acceptance': {}})
    if row['num_draft'] == 0:
      t['target_tokens_per_s'] = row['tokens_per_s']
    else:
      t['speedup'][row['num_draft']] = row['speedup']
      t['acceptance'][row['num_draft']] = row['acceptance']
  greedy = by_temperature.get('0.0', next(iter(by_temperature.values())))
  best = max(greedy['speedup'], key=greedy['speedup'].get)
  return {
      'speedup': greedy['speedup'], 'acceptance': greedy['acceptance'],
      'best_num_draft': best, 'best_speedup': greedy['speedup'][best],
      'temperatures': by_temperature,
      'target_params': count_params(target_run.model_cfg).total,
      'draft_params': count_params(draft_run.model_cfg).total,
      'target': target_run.model_cfg.pattern, 'draft': draft_run.model_cfg.pattern,
      'target_d_model': target_run.model_cfg.d_model,
      'draft_d_model': draft_run.model_cfg.d_model,
  }


def plot(summary: dict, path: str) -> None:
  from eval.figures import plt, save
  fig, (ax_speed, ax_accept) = plt.subplots(1, 2, figsize=(10, 4))
  for temperature, t in summary['temperatures'].items():
    ks = sorted(t['speedup'], key=int)
    ax_speed.plot([int(k) for k in ks], [t['speedup'][k] for k in ks], 'o-',
                  label=f'temperature {temperature}')
    ax_accept.plot([int(k) for k in ks], [t['acceptance'][k] for k in ks], 'o-',
                   label=f'temperature {temperature}')
  ax_speed.axhline(1.0, color='gray', lw=0.8)
  ax_speed.set(xlabel='K (drafted tokens per round)', ylabel='speed-up over the target alone',
               title='tokens/s, speculative / target alone')
  ax_accept.set(xlabel='K (drafted tokens per round)', ylabel='accepted / drafted',
                title='acceptance rate', ylim=(0, 1))
  for ax in (ax_speed, ax_accept):
    ax.legend()
    ax.grid(alpha=0.3)
  fig.suptitle(f'target {summary["target"]} x {summary["target_d_model"]} '
               f'({summary["target_params"] / 1e6:.1f}M), draft {summary["draft"]} x '
               f'{summary["draft_d_model"]} ({summary["draft_params"] / 1e6:.2f}M)')
  save(fig, path, dpi=100)


def main(argv):
  del argv
  from train.restore import load_run, same_tokenizer
  from model.config import ConfigError
  f = flags.FLAGS
  config, workdir = f.config, f.workdir
  if bool(f.target) != bool(f.draft):
    raise ConfigError('give both --target and --draft (trained runs), or neither to train them')
  dirs = {'target': f.target, 'draft': f.draft} if f.target else train_models(config, workdir)
  if not same_tokenizer(dirs['target'], dirs['draft']):
    raise ConfigError(f'the draft {dirs["draft"]} has another tokenizer than the target '
                      f'{dirs["target"]}; speculative decoding needs the same one')
  target_run, draft_run = load_run(dirs['target']), load_run(dirs['draft'])
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'bench.jsonl'), 'w') as out:
    def on_row(row):
      out.write(json.dumps(row) + '\n')
      out.flush()
      what = f'K={row["num_draft"]}' if row['num_draft'] else 'target alone'
      extra = (f', acceptance {row["acceptance"]:.3f}, {row["speedup"]:.2f}x the target alone'
               if row['num_draft'] else '')
      say(f'temperature {row["temperature"]}, {what}: {row["tokens_per_s"]:.1f} tokens/s{extra}')
    rows = measure(target_run, draft_run, config.bench, on_row)
  summary = summarize(rows, target_run, draft_run)
  with open(os.path.join(workdir, 'summary.json'), 'w') as out:
    json.dump(summary, out, indent=1)
  plot(summary, os.path.join(workdir, 'speculative.png'))
  print(f'done: best K={summary["best_num_draft"]} at temperature 0: '
        f'{summary["best_speedup"]:.2f}x the target alone, acceptance '
        f'{summary["acceptance"][summary["best_num_draft"]]:.3f}; {workdir}/summary.json')


def define_flags() -> None:
  flags.DEFINE_string('target', None, 'A trained run to use as the target (with --draft).')
  flags.DEFINE_string('draft', None, 'A trained run to use as the draft (with --target).')


if __name__ == '__main__':
  define_flags()
  cli.command(main, 'Work directory: the runs, bench.jsonl, summary, plot.',
              config='speculative.py', makes='experiment')
