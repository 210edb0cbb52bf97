"""One-off variants, each in two forms that compute the same thing
(experiments/benchmark/variants.py):

  python -m experiments.benchmark.variants --workdir=runs/variants   # 30 s at a load of 4-5
  python -m experiments.benchmark.variants --workdir=runs/variants_mlp --config.variants=mlp_layout
  python -m experiments.benchmark.variants --workdir=runs/variants_quick \
      --config=experiments/configs/variants_benchmark.py:quick   # 1 round of 2 calls
      # 21 s at a load of 2-3 (19 CPU s)

- mlp_layout: the Nanda grokking MLP (128 -> 512 -> 128) on its full batch of 3,831 rows, at
  lengths 1 and 3 (its 3-token `a b =` sequences);
- clip_norm and attention: the nanogpt_cpu shape of experiments/configs/benchmark.py (attention at
  its batch 12, context 64).
"""

from ml_collections import ConfigDict

from experiments.configs import base, benchmark


def get_config(preset=''):
  nanogpt_cpu = benchmark.get_config().catalog.nanogpt_cpu
  c = ConfigDict()
  c.variants = 'mlp_layout,clip_norm,attention'  # comma-separated names
  c.rounds = 3              # interleaved rounds; the forms alternate which goes first
  c.repeats = 5             # timed calls per form and round, after one warm-up; the median counts
  c.mlp = ConfigDict(dict(rows=3831, d_model=128, d_ff=512, lengths=(1, 3)))
  c.clip = ConfigDict(dict(model=nanogpt_cpu.model, grad_clip=1.0))
  c.attention = ConfigDict(dict(model=nanogpt_cpu.model, batch=nanogpt_cpu.batch_size,
                                seq_len=nanogpt_cpu.seq_len))
  return base.with_preset(c, preset, quick={'rounds': 1, 'repeats': 2})
