"""How long the training loop waits for its batches (experiments/benchmark/loader.py):

  python -m experiments.benchmark.loader --workdir=runs/loader_benchmark   # ~2 min on 2 cores

The shakespeare_char recipe (experiments/configs/shakespeare_char.py) cut to 200 steps, 25 per
compiled call, trained `runs` times.
"""

from experiments.configs import base, shakespeare_char


def get_config(preset=''):
  c = shakespeare_char.get_config()
  c.train.num_steps = 200
  c.runs = 3  # training runs, one after the other; each gives its own figure
  return base.with_preset(c, preset)
