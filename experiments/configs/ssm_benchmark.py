"""Forward+backward time of one block of each mixer as the sequence length doubles
(experiments/benchmark/ssm.py):

  python -m experiments.benchmark.ssm --workdir=runs/ssm_benchmark
  python -m experiments.benchmark.ssm --workdir=runs/ssm_short --config.lengths=256,512,1024
  python -m experiments.benchmark.ssm --workdir=runs/ssm_quick \
      --config=experiments/configs/ssm_benchmark.py:quick   # to 1024, 1 repeat
      # 134 s at a load of 6-10 (72 CPU s)

The blocks are `model.blocks.Block` without a feed-forward, built from `model` (width 256, 4 heads
of 64 for attention; Mamba at its defaults: N = 16, Din = 2 D, conv 4, parallel scan in chunks of
128; Mamba-2 at its defaults but N = 64: 8 heads of 64, Din = 2 D, conv 4, SSD chunks of 256).
Attention at 8192 tokens holds a few (batch, heads, L, L) float32 arrays, 1 GiB each for batch 1
and 4 heads.
"""

from ml_collections import ConfigDict

from experiments.configs import base


def get_config(preset=''):
  c = ConfigDict()
  c.model = base.model_config(d_model=256, num_heads=4, vocab_size=1, max_len=8192)
  c.model.mamba2.d_state = 64
  c.mixers = ('mamba', 'mamba2', 'attn')  # registered mixer names, each timed as one block
  c.batch = 1
  c.lengths = (256, 512, 1024, 2048, 4096, 8192)
  c.repeats = 3                 # timed calls per measurement, after one warm-up call
  return base.with_preset(c, preset, quick={'lengths': (256, 512, 1024), 'repeats': 1})
