"""Speed of the grokking train step: what answer-only losses and scanned calls save.

    python -m experiments.grokking_bench --out=grokking_bench.json \
        [--config=experiments/configs/grokking_nanda2023.py] [--steps=20]

Times `--steps` full-batch steps of the config's task three ways and prints a table (ms per step,
GFLOP per step from XLA's cost analysis, speed-up over the first row); the same rows go to --out:
  all positions, one call per step   the generic LM loss (make_loss_fn) on `a b =` with weight on
                                     the answer only: logits and feed-forward at every position
  answer only, one call per step     LM(..., last_only=True): the final feed-forward and the head
                                     run on the answer position alone
  answer only, scanned call          the same steps as one lax.scan over steps (experiments/
                                     grokking.py's make_call): one dispatch for all of them
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import grokking
from train import cli, optim, perf, step as step_lib
from train.errors import quiet_libraries

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs',
                              'grokking_nanda2023.py')


def measure(config, steps: int, repeats: int = 5) -> list[dict]:
  setup = grokking.build(config)
  train = jax.device_put(setup.task.train)
  full = dict(train, targets=jnp.concatenate([train['inputs'][:, 1:], train['targets']], axis=1),
              weights=jnp.zeros(train['inputs'].shape).at[:, -1].set(1.0))
  tc = config.train
  all_positions = jax.jit(step_lib.make_train_step(
      setup.model, optim.make_optimizer(tc), optim.learning_rate_schedule(tc), tc.seed))
  answer_only = jax.jit(setup.step)
  scanned = grokking.make_call(setup.step, lambda params, tr, val: {}, eval_every=steps)

  def loop(step, batch):
    def run(state):
      for _ in range(steps):
        state, _ = step(state, batch)
      return state
    return run

  cases = {'all positions, one call per step': loop(all_positions, full),
           'answer only, one call per step': loop(answer_only, train),
           'answer only, scanned call': lambda state: scanned(state, train, train, 1)}
  # Repeats interleave the cases, so that a busy machine slows them alike; median per case.
  seconds = {name: [] for name in cases}
  for repeat in range(repeats + 1):  # the first compiles
    for name, run in cases.items():
      state = jax.tree.map(jnp.copy, setup.state)  # the scanned call donates its state
      start = time.perf_counter()
      jax.block_until_ready(run(state))
      if repeat:
        seconds[name].append(time.perf_counter() - start)
  step_flops = [all_positions.lower(setup.state, full), answer_only.lower(setup.state, train)]
  gflop = [f.compile().cost_analysis()['flops'] / 1e9 for f in step_flops]
  rows = [{'case': name, 'ms_per_step': 1000 * float(np.median(s)) / steps,
           'gflop_per_step': g} for (name, s), g in zip(seconds.items(), gflop + gflop[-1:])]
  for row in rows:
    row['speedup'] = rows[0]['ms_per_step'] / row['ms_per_step']
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_libraries()
  config = flags.FLAGS.config
  rows = measure(config, flags.FLAGS.steps)
  print(f'{config.task.operation} mod {config.task.prime}, '
        f'{config.task.train_fraction:g} of the table per step, {perf.device_description()}')
  print(f'{"case":36s} {"ms/step":>9s} {"GFLOP/step":>11s} {"speed-up":>9s}')
  for r in rows:
    print(f'{r["case"]:36s} {r["ms_per_step"]:9.1f} {r["gflop_per_step"]:11.2f} '
          f'{r["speedup"]:8.2f}x')
  with open(flags.FLAGS.out, 'w') as f:
    json.dump({'device': perf.device_description(), 'steps': flags.FLAGS.steps,
               'config': config.to_dict(), 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Experiment config; default '
                                  'experiments/configs/grokking_nanda2023.py.', lock_config=True)
  flags.DEFINE_integer('steps', 20, 'Steps per timed repeat.')
  flags.DEFINE_string('out', 'grokking_bench.json', 'Where the rows go (JSON).')
  sys.argv = grokking.with_default_config(sys.argv, DEFAULT_CONFIG)
  cli.run(main)
