"""python -m experiments.benchmark.moe --workdir=DIR [--config=experiments/configs/moe_benchmark.py]

An MoE against the dense model of the same active parameters, each a normal training run of the
config (by default the shakespeare_char recipe with 8 experts of width 172, top-2) in DIR/<name>/:
dense (attn*4, feed-forward width top_k x model.moe.d_ff), moe (attn:moe*4) and, with
`--config.dropless=true`, moe_dropless (capacity factor 0). The same command again resumes an
interrupted run, skips one finished from the same config and trains one of another config afresh
(experiments/stages.py). Prints one table (parameters, training FLOPs per token, tokens/s,
validation loss on the whole split) and writes it to DIR/moe_benchmark.json. Tokens/s is the
median over the logged windows of training steps (compilation and evaluation excluded).
"""

import json
import os

from absl import flags

from train import cli



def run_configs(config) -> dict:
  """The runs' configs by name: the dense model and the MoE (and the dropless MoE)."""
  runs = {}
  for name, pattern, capacity in (('dense', 'attn*4', None), ('moe', 'attn:moe*4', None),
                                  ('moe_dropless', 'attn:moe*4', 0.0)):
    if name == 'moe_dropless' and not config.dropless:
      continue
    c = config.copy_and_resolve_references()
    with c.unlocked():
      del c['dropless']
    c.model.pattern = pattern
    if name == 'dense':
      c.model.d_ff = c.model.moe.top_k * c.model.moe.d_ff
    if capacity is not None:
      c.model.moe.capacity_factor = capacity
    runs[name] = c
  return runs


def train_one(name: str, config, workdir: str) -> dict:
  """The run's row of the table: trained in DIR/<name> unless done from the same config
  (experiments/stages.py)."""
  from experiments import stages
  from train import loop

  def train(run_dir):
    return row(name, config, run_dir, loop.train_and_evaluate(config, run_dir))

  return stages.run(stages.Stage(workdir, name, config.to_dict(),
                                 [os.path.join(workdir, name)]), train, in_place=True)['result']


def row(name: str, config, run_dir: str, final: dict) -> dict:
  import numpy as np

  from model import ModelConfig, count_params, training_flops_per_token
  from train import workdir as workdir_lib

  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  model_cfg = ModelConfig.from_dict(workdir_lib.load_config(run_dir).model)
  counts = count_params(model_cfg)
  last = [r for r in rows if 'train_loss' in r][-1]
  dropped = [v for k, v in last.items() if k.endswith('dropped_fraction')]
  return {'model': name, 'pattern': model_cfg.pattern,
          'params_total': counts.total, 'params_active_non_embedding': counts.active_non_embedding,
          'params_non_embedding': counts.non_embedding,
          'train_mflops_per_token': training_flops_per_token(model_cfg, config.data.seq_len) / 1e6,
          'tokens_per_s': float(np.median([r['tokens_per_s'] for r in rows
                                           if 'tokens_per_s' in r])),
          'val_loss': final['val_loss'], 'train_loss': last['train_loss'],
          'dropped_fraction': float(np.mean(dropped)) if dropped else None,
          'wall_s': final.get('wall_s'), 'steps': final['step']}


def table(results: list[dict]) -> str:
  lines = ['| model | pattern | params (total) | active non-emb. params | train MFLOPs/token | '
           'tokens/s | val loss | dropped |', '|' + ' --- |' * 8]
  for r in results:
    dropped = '-' if r['dropped_fraction'] is None else f'{100 * r["dropped_fraction"]:.1f}%'
    lines.append(f'| {r["model"]} | `{r["pattern"]}` | {r["params_total"]:,} | '
                 f'{r["params_active_non_embedding"]:,} | {r["train_mflops_per_token"]:.2f} | '
                 f'{r["tokens_per_s"]:,.0f} | {r["val_loss"]:.4f} | {dropped} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  from train import perf
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  runs = run_configs(config)
  peak = perf.peak_flops_per_s(config.model.dtype, config.train.peak_flops)
  results = []
  for name, run_config in runs.items():
    run_config.train.peak_flops = peak  # measured once: every run's MFU shares a denominator
    results.append(train_one(name, run_config, workdir))
  text = table(results)
  print(f'\n{config.train.num_steps} steps each on {perf.device_description()}\n{text}')
  with open(os.path.join(workdir, 'moe_benchmark.json'), 'w') as f:
    json.dump({'steps': config.train.num_steps, 'device': perf.device_description(),
               'results': results}, f, indent=1)


if __name__ == '__main__':
  cli.command(main, 'Directory for the runs and moe_benchmark.json.', config='moe_benchmark.py',
              makes='experiment')
