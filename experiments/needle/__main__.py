"""Needle in a haystack: pass-key retrieval accuracy by depth and length, as a heat map.

  python -m experiments.needle --workdir=runs/needle                 # train on the format, probe
  python -m experiments.needle --workdir=DIR --probe_only            # probe the run in DIR
  python -m experiments.needle --workdir=DIR --probe_only \
      --config.model.rope_scaling=yarn --config.model.rope_factor=2  # ... stretched

Training is a normal language-modelling run (`train.loop.train_and_evaluate`) on the TFDS
dataset `needle_haystack/len<N>` (haystack.py), generated in process before the run starts. The
probe (probe.py) then places the needle at each of `probe.depths` in probes of each of
`probe.lengths` characters, from filler the run never trained on, and counts the probes whose
digits the model predicts after the question. --probe_only reads any run trained on the format
(its config.json, with `--config.x.y` overrides, e.g. a RoPE scaling).

Writes into the work directory (besides the run itself): needle.json (the accuracy grid, its
lengths and depths) and needle.png (the heat map).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

from train import cli



def check_config(config) -> None:
  from experiments.needle import haystack
  from model.config import ConfigError
  p = config.probe
  if not p.lengths or min(p.lengths) <= haystack.overhead():
    raise ConfigError(f'probe.lengths={tuple(p.lengths)}: each must be longer than the '
                      f'{haystack.overhead()} characters of needle, question and answer')
  if not p.depths or not all(0.0 <= d <= 1.0 for d in p.depths):
    raise ConfigError(f'probe.depths={tuple(p.depths)} must be in [0, 1]')
  if p.num < 1:
    raise ConfigError(f'probe.num must be >= 1, got {p.num}')


def train(config, workdir: str) -> None:
  from experiments.needle import haystack
  from model.config import ConfigError
  from train import loop
  name = config.data.tfds_name
  if not name.startswith('needle_haystack/') or config.data.tokenizer != 'char':
    raise ConfigError(f'data.tfds_name={name!r} with tokenizer {config.data.tokenizer!r}: the '
                      f'needle run trains on needle_haystack/len<N> with the char tokenizer')
  haystack.prepare(name, config.data.tfds_data_dir)
  doc_len = int(name.split('/len')[1])
  if config.data.seq_len != doc_len:
    raise ConfigError(f'data.seq_len={config.data.seq_len} must be the probes\' length {doc_len}, '
                      f'so that each window is one whole probe')
  loop.train_and_evaluate(config, workdir)


def probe(config, workdir: str) -> dict:
  from train.restore import load_run
  from experiments.configs import base
  from experiments.needle import haystack, plots, probe as probe_lib
  from train.progress import phase
  run = load_run(workdir, None, config)
  p = config.probe
  filler = haystack.filler_text(base.TINY_SHAKESPEARE, 'validation')
  with phase(f'probing {len(p.depths)} depths x {len(p.lengths)} lengths, {p.num} probes each'):
    grid = probe_lib.accuracy_grid(run.model, run.params, run.tokenizer, filler, p.lengths,
                                   p.depths, p.num, p.seed)
  result = {'step': run.step, 'trained_len': run.config.data.seq_len,
            'position': run.model_cfg.position, 'rope_scaling': run.model_cfg.rope_scaling,
            'rope_factor': run.model_cfg.rope_factor, 'lengths': list(p.lengths),
            'depths': list(p.depths), 'num': p.num,
            'accuracy': [[None if v != v else float(v) for v in row] for row in grid]}
  with open(os.path.join(workdir, 'needle.json'), 'w') as f:
    json.dump(result, f, indent=1)
  plots.heat_map(result, os.path.join(workdir, 'needle.png'))
  return result


def main(argv):
  del argv
  from train.progress import say
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  check_config(config)
  start = time.time()
  if not flags.FLAGS.probe_only:
    train(config, workdir)
  result = probe(config, workdir)
  say('depth \\ length ' + ''.join(f'{n:>7}' for n in result['lengths']))
  for depth, row in zip(result['depths'], result['accuracy']):
    say(f'{depth:>14.0%} ' + ''.join(f'{"-":>7}' if v is None else f'{v:>7.2f}' for v in row))
  say(f'done: {os.path.join(workdir, "needle.png")}, wall {time.time() - start:.0f}s')


def define_flags() -> None:
  flags.DEFINE_bool('probe_only', False, 'Probe the run already in --workdir (its config.json, '
                    'with --config.x.y overrides) without training.')


if __name__ == '__main__':
  define_flags()
  probe_only = '--probe_only' in sys.argv or '--probe_only=true' in sys.argv
  # Trains a run in DIR (needle.json and needle.png beside it); --probe_only reads any run.
  cli.command(main, 'Work directory: the run, needle.json and needle.png.',
              config=cli.RUN_CONFIG if probe_only else 'needle.py',
              makes=None if probe_only else 'run')
