"""python -m experiments.benchmark.pytorch --workdir=DIR
    [--config=experiments/configs/pytorch_benchmark.py]

nexttoken's nanogpt_cpu training rate against nanoGPT's in PyTorch, measured in one run: each
round runs, each in a fresh process and in an order that rotates from round to round,

- nexttoken: `python -m experiments.benchmark --config.shapes=nanogpt_cpu --config.decode=false
  --config.repeats=<nexttoken_repeats>`, its nanogpt_cpu shape set to the config's (a SwiGLU of
  width 8 D / 3, rounded up to a multiple of 8, keeps the parameters of nanoGPT's GELU MLP of 4 D:
  344 at width 128);
- pytorch: `python -m experiments.benchmark.torch_gpt` (the PyTorch peer; see its docstring) with
  this config;
- each of `variants`: the PyTorch peer with some harness choices changed.

Prints each round's tokens/s and the median of each entry's rounds, with its ratio to PyTorch's
median and the median of the per-round ratios, and each PyTorch entry's median CPU time a step
(all its threads: less sensitive to other processes than the wall time, and showing spinning);
writes DIR/pytorch_benchmark.json, and each run's own output under DIR/rounds/<round>/<entry>/.
Needs PyTorch (`pip install -e '.[peer]'`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

from absl import flags

from experiments.benchmark import torch_gpt
from train import cli

PEER_KEYS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size', 'batch_size', 'lr',
             'beta2', 'weight_decay', 'grad_clip', 'nanogpt_dir', 'threads', 'omp_wait_policy',
             'optimizer',
             'set_to_none', 'sample_batches', 'read_loss', 'matmul_precision',
             'steps_per_timing', 'warmup', 'repeats')


def variants(config) -> dict[str, list[str]]:
  """The PyTorch entries by name: 'pytorch', then one per ';'-separated variant, named by its
  'key=value' overrides."""
  from model.config import ConfigError
  entries = {'pytorch': []}
  for variant in filter(None, (v.strip() for v in config.variants.split(';'))):
    overrides = variant.split()
    for o in overrides:
      key = o.split('=', 1)[0]
      if '=' not in o or key not in PEER_KEYS:
        raise ConfigError(f'config.variants: {o!r} is not key=value with a key of '
                          f'{list(PEER_KEYS)}')
    entries[' '.join(overrides)] = overrides
  return entries


def swiglu_width(d_model: int) -> int:
  """The SwiGLU width whose 3 x D x F parameters match a GELU MLP of 4 D (8 D^2), a multiple of
  8."""
  return 8 * math.ceil(8 * d_model / 3 / 8)


def commands(config, workdir: str) -> dict[str, list[str]]:
  """Each entry's command line (without its --workdir)."""
  shape = '--config.catalog.nanogpt_cpu.'
  nexttoken = [
      '-m', 'experiments.benchmark', '--config.shapes=nanogpt_cpu', '--config.decode=false',
      f'--config.repeats={config.nexttoken_repeats}',
      f'{shape}model.d_model={config.n_embd}', f'{shape}model.num_heads={config.n_head}',
      f'{shape}model.d_ff={swiglu_width(config.n_embd)}',
      f'{shape}model.pattern=attn*{config.n_layer}', f'{shape}model.vocab_size={config.vocab_size}',
      f'{shape}batch_size={config.batch_size}', f'{shape}seq_len={config.block_size}']
  peer = ['-m', 'experiments.benchmark.torch_gpt'] + [f'--config.{k}={config[k]}'
                                                       for k in PEER_KEYS]
  out = {'nexttoken': nexttoken}
  for name, overrides in variants(config).items():
    out[name] = peer + [f'--config.{o}' for o in overrides]
  return out


def run_entry(argv: list[str], workdir: str, result_file: str) -> dict:
  """Runs one entry in a fresh process; its result file's contents. A failing entry ends the
  command with its own last lines."""
  from train.records import RunError
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh measurement, never a resumed one
  done = subprocess.run([sys.executable, *argv, f'--workdir={workdir}'], capture_output=True,
                        text=True)
  if done.returncode:
    raise RunError(f'{" ".join(argv[:2])} failed (exit status {done.returncode}): '
                   f'{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""}')
  with open(os.path.join(workdir, result_file)) as f:
    return json.load(f)


def entry_rates(name: str, result: dict) -> tuple[float, float | None]:
  """(tokens/s, CPU ms a step) of an entry's result; nexttoken's benchmark has no CPU time."""
  if name == 'nexttoken':
    return result['train'][0]['tokens_per_s'], None
  return result['tokens_per_s'], result['cpu_ms_per_step']


def summarise(rounds: list[dict[str, float]], cpu_ms: dict[str, list] | None = None) -> dict:
  """Per entry: its rounds, their median, the ratio of medians to PyTorch's and the median of the
  per-round ratios to PyTorch; the median CPU ms a step where `cpu_ms` has it."""
  import numpy as np
  names = list(rounds[0])
  out = {}
  for name in names:
    rates = [r[name] for r in rounds]
    cpu = [c for c in (cpu_ms or {}).get(name, []) if c is not None]
    out[name] = {'tokens_per_s': rates, 'median': float(np.median(rates)),
                 'cpu_ms_per_step': float(np.median(cpu)) if cpu else None,
                 'ratio_of_medians': float(np.median(rates) /
                                           np.median([r['pytorch'] for r in rounds])),
                 'median_ratio': float(np.median([r[name] / r['pytorch'] for r in rounds]))}
  return out


def format_table(summary: dict) -> str:
  rounds = len(next(iter(summary.values()))['tokens_per_s'])
  width = max(len(n) for n in summary) + 2
  lines = [f'{"tokens/s":<{width}}' + ''.join(f'{f"round {i + 1}":>10}' for i in range(rounds))
           + f'{"median":>10}{"/ pytorch":>11}{"median of rounds":>18}{"CPU ms/step":>13}']
  for name, s in summary.items():
    cpu = '-' if s['cpu_ms_per_step'] is None else f'{s["cpu_ms_per_step"]:.1f}'
    lines.append(f'{name:<{width}}' + ''.join(f'{r:>10,.0f}' for r in s['tokens_per_s'])
                 + f'{s["median"]:>10,.0f}{s["ratio_of_medians"]:>10.2f}x'
                 f'{s["median_ratio"]:>17.2f}x{cpu:>13}')
  return '\n'.join(lines)


def main(argv):
  del argv
  from model.config import ConfigError
  from train.progress import say
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  torch_gpt.import_torch()  # no PyTorch: one line before anything runs
  torch_gpt.check_config(config)
  if config.rounds < 1:
    raise ConfigError(f'config.rounds={config.rounds} must be at least 1')
  entries = commands(config, workdir)
  names = list(entries)
  rounds, loads, cpu_ms = [], [], {name: [] for name in names}
  for r in range(config.rounds):
    order = names[r % len(names):] + names[:r % len(names)]  # rotated: no entry always first
    per_round = {}
    for name in order:
      result_file = 'benchmark.json' if name == 'nexttoken' else 'torch_gpt.json'
      entry_dir = os.path.join(workdir, 'rounds', str(r + 1), re.sub(r'[^\w=.-]+', '_', name))
      tokens, cpu = entry_rates(name, run_entry(entries[name], entry_dir, result_file))
      per_round[name] = tokens
      cpu_ms[name].append(cpu)
      say(f'round {r + 1}: {name} {tokens:,.0f} tokens/s')
    rounds.append({name: per_round[name] for name in names})
    loads.append(os.getloadavg()[0])
  say(f'load average (1 min) after each round: {", ".join(f"{l:.1f}" for l in loads)}')
  summary = summarise(rounds, cpu_ms)
  print(format_table(summary))
  with open(os.path.join(workdir, 'pytorch_benchmark.json'), 'w') as f:
    json.dump({'config': config.to_dict(), 'commands': entries, 'entries': summary,
               'load_average_after_rounds': loads}, f, indent=1)


if __name__ == '__main__':
  cli.command(main, 'Where pytorch_benchmark.json and each round\'s runs are written.',
              config='pytorch_benchmark.py', makes='experiment', errors=(torch_gpt.PeerMissing,))
