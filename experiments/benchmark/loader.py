"""python -m experiments.benchmark.loader --workdir=DIR
    [--config=experiments/configs/loader_benchmark.py]

The time the training loop waits for its batches: `train.data.BatchIterator.next`, which hands
the loop `train.steps_per_call` batches before each compiled call, is wrapped in a timer while
`train.loop.train_and_evaluate` trains the config `runs` times (each in a scratch directory under
DIR, removed after). The first call's batches are left out: they are read before the compile,
with nothing to overlap. Per run: milliseconds of waiting per training step; prints them and
their median, and writes DIR/loader_benchmark.json.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from unittest import mock

import numpy as np
from absl import flags

from train import cli


def wait_per_step(config, workdir: str) -> dict:
  """One training run of `config` in a scratch directory under `workdir`: its calls' waits for
  batches, and the mean wait per step after the first call."""
  from train import data, loop
  waits = []  # (steps, seconds) of each BatchIterator.next call
  take = data.BatchIterator.next

  def timed_next(iterator, steps):
    start = time.perf_counter()
    batches = take(iterator, steps)
    waits.append((steps, time.perf_counter() - start))
    return batches

  run_dir = tempfile.mkdtemp(prefix='run_', dir=workdir)
  try:
    with mock.patch.object(data.BatchIterator, 'next', timed_next):
      loop.train_and_evaluate(config, run_dir)
  finally:
    shutil.rmtree(run_dir)
  later = waits[1:]
  return {'calls': len(waits), 'first_call_ms': 1e3 * waits[0][1],
          'ms_per_step': 1e3 * sum(s for _, s in later) / max(sum(n for n, _ in later), 1)}


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  train_config = config.copy_and_resolve_references()
  with train_config.unlocked():
    del train_config['runs']
  os.makedirs(workdir, exist_ok=True)
  runs = [wait_per_step(train_config, workdir) for _ in range(config.runs)]
  median = float(np.median([r['ms_per_step'] for r in runs]))
  print(f'ms per step waiting for batches, after the first call ({config.train.num_steps} steps, '
        f'{config.train.steps_per_call} per call): '
        + ' / '.join(f'{r["ms_per_step"]:.3f}' for r in runs) + f'; median {median:.3f}')
  with open(os.path.join(workdir, 'loader_benchmark.json'), 'w') as f:
    json.dump({'runs': runs, 'median_ms_per_step': median, 'load_average': os.getloadavg(),
               'config': config.to_dict()}, f, indent=1)


if __name__ == '__main__':
  cli.command(main, 'Where loader_benchmark.json is written (the runs train in scratch '
              'directories under it).', config='loader_benchmark.py', makes='experiment')
