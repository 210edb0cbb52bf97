"""An 8-expert top-2 MoE against the dense model of the same active parameters, tiny shakespeare.

  python -m experiments.moe_benchmark --workdir=/tmp/moe_benchmark [--steps=2000] [--dropless]

Both are the shakespeare_char recipe (experiments/configs/shakespeare_char.py: 4 layers, width 128,
context 64, batch 12, AdamW, same data order), trained one after the other in this process:
- dense: attn*4 with SwiGLU width 344, the main job itself;
- moe:   attn:moe*4 with 8 experts of width 172, top-2, capacity factor 1.25: per token the same
         2 x 172 = 344 feed-forward width (plus a 128 x 8 router), four times the parameters;
- moe_dropless (with --dropless): the same MoE without capacity (grouped matmuls).
Each run lives in DIR/<name>/ (the same command again resumes finished runs instead of retraining).
Prints one table (parameters, training FLOPs per token, tokens/s, validation loss on the whole
split) and writes it to DIR/moe_benchmark.json. Tokens/s is the median over the logged windows of
training steps (compilation and evaluation excluded).
"""

import json
import os

from absl import flags

from train import cli

flags.DEFINE_string('workdir', None, 'Directory for the runs and moe_benchmark.json.')
flags.DEFINE_integer('steps', 2000, 'Training steps of each model.')
flags.DEFINE_boolean('dropless', False, 'Also train the MoE without capacity (capacity_factor 0).')
flags.mark_flag_as_required('workdir')

EXPERT_WIDTH = 172
MOE = dict(num_experts=8, top_k=2, d_ff=EXPERT_WIDTH)


def models(dropless: bool) -> dict[str, dict]:
  """Model overrides of the shakespeare_char config, by run name."""
  runs = {'dense': dict(pattern='attn*4', d_ff=MOE['top_k'] * EXPERT_WIDTH),
          'moe': dict(pattern='attn:moe*4', moe=dict(MOE, capacity_factor=1.25))}
  if dropless:
    runs['moe_dropless'] = dict(pattern='attn:moe*4', moe=dict(MOE, capacity_factor=0.0))
  return runs


def train_one(name: str, overrides: dict, workdir: str, steps: int, peak_flops: float) -> dict:
  import numpy as np

  from experiments.configs import shakespeare_char
  from model import ModelConfig, count_params, training_flops_per_token
  from train import loop, workdir as workdir_lib

  config = shakespeare_char.get_config()
  config.model.update(overrides)
  config.train.update(num_steps=steps, peak_flops=peak_flops)
  run_dir = os.path.join(workdir, name)
  final = loop.train_and_evaluate(config, run_dir)
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
  if len(argv) > 1:
    raise SystemExit(f'unexpected arguments: {argv[1:]}')
  from train import perf
  from train.errors import quiet_libraries
  quiet_libraries()
  workdir, steps = flags.FLAGS.workdir, flags.FLAGS.steps
  os.makedirs(workdir, exist_ok=True)
  peak = perf.measure_peak_flops()  # once, so both runs' MFU share a denominator
  results = [train_one(name, overrides, workdir, steps, peak)
             for name, overrides in models(flags.FLAGS.dropless).items()]
  text = table(results)
  print(f'\n{steps} steps each on {perf.device_description()}\n{text}')
  with open(os.path.join(workdir, 'moe_benchmark.json'), 'w') as f:
    json.dump({'steps': steps, 'device': perf.device_description(), 'results': results}, f,
              indent=1)


if __name__ == '__main__':
  cli.run(main)
