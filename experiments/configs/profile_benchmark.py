"""Where a train call's time goes, by XLA op kind (experiments/benchmark/profile.py):

  python -m experiments.benchmark.profile --workdir=runs/profile                # nanogpt_cpu
  python -m experiments.benchmark.profile --workdir=runs/profile --config.programs=grokking

`programs` names shapes of the benchmark's catalog (experiments/configs/benchmark.py) or
`grokking`: the Nanda et al. config's scanned call (experiments/configs/grokking_bench.py).
"""

from experiments.configs import base, benchmark


def get_config(preset=''):
  c = benchmark.get_config()
  for key in ('shapes', 'cpu', 'accelerator', 'repeats', 'decode'):
    del c[key]
  c.programs = 'nanogpt_cpu'  # comma-separated: catalog shapes, or grokking
  c.calls = 3                 # traced calls, after one untraced warm-up call
  c.steps_per_call = 10       # train steps per call (grokking: its config's train.steps_per_call)
  c.top = 12                  # op kinds listed one by one; the others are summed as "the rest"
  return base.with_preset(c, preset)
