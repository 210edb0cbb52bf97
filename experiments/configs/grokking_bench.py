"""The grokking train step timed three ways (experiments/grokking/bench.py), on Nanda et al.'s
config: a + b mod 113, 30% of the table, width 128.

  python -m experiments.grokking.bench --workdir=runs/grokking_bench
  python -m experiments.grokking.bench --workdir=runs/grokking_bench_quick \
      --config=experiments/configs/grokking_bench.py:quick   # 2 repeats
      # 80 s at a load of 6 (39 CPU s)

Each timed call runs train.steps_per_call full-batch steps; five interleaved repeats, the median
per case (`repeats`).
"""

from experiments.configs import base, grokking_nanda2023


def get_config(preset=''):
  c = grokking_nanda2023.get_config()
  c.train.steps_per_call = 10
  c.train.eval_every = 10   # a call must end on an evaluation; the timed calls evaluate nothing
  c.repeats = 5
  return base.with_preset(c, preset, quick={'repeats': 2})
