from __future__ import annotations

import json
import os

import numpy as np
from absl import flags

from train import cli


def measure(config) -> list[dict]:
  import jax
  import jax.numpy as jnp

  import experiments.grokking.__main__ as grokking
  from train import optim, perf, step as step_lib
  setup = grokking.build(config)
  train = jax.device_put(setup.task.train)
  full = dict(train, targets=jnp.concatenate([train['inputs'][:, 1:], train['targets']], axis=1),
              weights=jnp.zeros(train['inputs'].shape).at[:, -1].set(1.0))
  tc = config.train
  steps = tc.steps_per_call
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
  # Repeats interleave the cases, so that a busy machine slows them alike; median per case. Each
  # timed call starts from a copy of the initial state (the scanned call donates its state).
  seconds = {name: [] for name in cases}
  for repeat in range(config.repeats):
    for name, run in cases.items():
      seconds[name].append(perf.timed(lambda: run(jax.tree.map(jnp.copy, setup.state)),
                                      repeats=1, warmup=int(repeat == 0)))
  step_flops = [all_positions.lower(setup.state, full), answer_only.lower(setup.state, train)]
  gflop = [f.compile().cost_analysis()['flops'] / 1e9 for f in step_flops]
  rows = [{'case': name, 'ms_per_step': 1000 * float(np.median(s)) / steps,
           'gflop_per_step': g} for (name, s), g in zip(seconds.items(), gflop + gflop[-1:])]
  for row in rows:
    row['speedup'] = rows[0]['ms_per_step'] / row['ms_per_step']
  return rows


def main(argv):
  del argv
  from train import perf
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  rows = measure(config)
  print(f'{config.task.operation} mod {config.task.prime}, '
        f'{config.task.train_fraction:g} of the table per step, {config.train.steps_per_call} '
        f'steps per timed call, {perf.device_description()}')
  print(f'{"case":36s} {"ms/step":>9s} {"GFLOP/step":>11s} {"speed-up":>9s}')
  for r in rows:
    print(f'{r["case"]:36s} {r["ms_per_step"]:9.1f} {r["gflop_per_step"]:11.2f} '
          f'{r["speedup"]:8.2f}x')
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'grokking_bench.json'), 'w') as f:
    json.dump({'device': perf.device_description(), 'config': config.to_dict(), 'rows': rows},
              f, indent=1)


if __name__ == '__main__':
  cli.command(main, 'Where grokking_bench.json is written.', config='grokking_bench.py',
              makes='experiment')
