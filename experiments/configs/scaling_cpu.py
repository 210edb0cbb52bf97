"""Scaling laws of a small transformer on tiny shakespeare, on a 2-core CPU.

  python -m experiments.scaling --config=experiments/configs/scaling_cpu.py --workdir=/tmp/scaling
  python -m experiments.scaling --config=experiments/configs/scaling_cpu.py:quick \
      --workdir=/tmp/scaling_quick   # depths 1-4 at 131k characters, 4 runs
      # 90 s at a load of 4 (87 CPU s)

Depths 1..6 at d_model = 16 x depth (head width 16), RoPE, RMSNorm, SwiGLU with F = 4 d_model:
N from 4.1k to 886k non-embedding parameters (214x). Budgets D of 2^16..2^22 characters (64k to
4.2M), each run's cosine schedule over its own budget; runs above 8e11 training FLOPs are left
out, so the small models get the long budgets that bracket the compute-optimal frontier and every
size runs 64k and 131k. 24 runs, 4.9e12 training FLOPs (`--dry_run` lists them). L(N) is fitted
at 131k, the largest budget every size ran. The measured wall time and the fitted exponents are
in docs/scaling.md.

Any block pattern can be swept: --config.sweep.pattern='(attn,attn:moe)*{depth}' puts an MoE
feed-forward in every other layer, 'mamba*{depth}' sweeps Mamba, '(mamba*3,attn)*{depth}' a hybrid
(the rule widens by the number of layers the pattern makes).
"""

from ml_collections import ConfigDict

from experiments.configs import base


def get_config(preset=''):
  c = base.get_config()
  c.model.update(position='rope', norm='rmsnorm', activation='swiglu', dropout=0.0,
                 scan_layers=False)
  c.data.update(path=base.TINY_SHAKESPEARE, tfds_fallback='tiny_shakespeare', tokenizer='char',
                seq_len=64)
  c.train.update(batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=20, schedule='cosine',
                 b2=0.99, weight_decay=0.1, grad_clip=1.0, steps_per_call=32, log_every=256,
                 eval_every=0, eval_batch_size=128, checkpoint_every=512, keep_checkpoints=1)
  c.sweep = ConfigDict(dict(
      pattern='attn*{depth}',       # the block pattern; the size rule fills in {depth}
      depths=(1, 2, 3, 4, 5, 6),    # one model size each
      aspect_ratio=16,              # d_model = aspect_ratio x layers (Kaplan et al.'s shape)
      head_dim=16,                  # num_heads = d_model / head_dim
      # Token budgets D, 2^16..2^22: num_steps = D / (batch_size x seq_len), multiples of
      # steps_per_call (a shorter last call would compile again).
      tokens=tuple(2 ** k for k in range(16, 23)),
      max_flops=8e11,               # leave out runs above this many training FLOPs; 0: none
  ))
  # Four sizes at one budget, 131k characters: 4 runs, L(N) fitted (no IsoFLOP minima).
  return base.with_preset(c, preset, quick={'sweep.depths': (1, 2, 3, 4),
                                            'sweep.tokens': (2 ** 17,)})
