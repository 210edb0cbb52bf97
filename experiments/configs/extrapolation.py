"""Length extrapolation (Press et al. 2022): one small model per positional scheme, trained at 64
characters of tiny shakespeare, evaluated by position up to 16x that length.

  python -m experiments.extrapolation --workdir=runs/extrapolation
  python -m experiments.extrapolation --workdir=runs/extrapolation --config.sweep.schemes=rope,alibi
  python -m experiments.extrapolation --workdir=runs/extrapolation_quick \
      --config=experiments/configs/extrapolation.py:quick   # 3 schemes, 200 steps
      # 243 s at a load of 8-9

Each scheme is a normal training run (train/loop.py) of the same shape: 3 attention layers of
width 64 (Mamba: 3 Mamba layers of the same width), 4 heads, context 64, 600 steps of batch 32.
RoPE is evaluated again with each scaling (linear, ntk, yarn) at factor s = length / 64. The
measured figures and the wall time on a 2-core CPU are in docs/long_context.md.
"""

from ml_collections import ConfigDict

from experiments.configs import base, shakespeare_char


def get_config(preset=''):
  c = shakespeare_char.get_config()  # its corpus, tokenizer, context, block and optimizer
  c.model.update(d_model=64, d_ff=172, pattern='attn*3', max_len=64)
  c.train.update(num_steps=600, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=50,
                 steps_per_call=50, log_every=100, eval_every=0, checkpoint_every=600,
                 keep_checkpoints=1)
  c.sweep = ConfigDict(dict(
      schemes=('rope', 'alibi', 'sinusoidal', 'learned', 'none', 'mamba'),
      mamba_pattern='mamba*3',     # the 'mamba' scheme's blocks (no positions: position=none)
      mamba_scan_impl='parallel',  # model.mamba.scan_impl of the 'mamba' scheme
      lengths=(64, 128, 256, 512, 1024),   # evaluation lengths; the first is the training one
      rope_scalings=('linear', 'ntk', 'yarn'),  # RoPE stretched at evaluation, s = length / 64
      eval_tokens=65536,           # validation tokens read at each length (the whole split: 0)
  ))
  # RoPE, ALiBi and no positions, to 4x the training length.
  return base.with_preset(c, preset, quick={
      'train.num_steps': 200, 'train.checkpoint_every': 200,
      'sweep.schemes': ('rope', 'alibi', 'none'), 'sweep.lengths': (64, 128, 256),
      'sweep.rope_scalings': ('yarn',), 'sweep.eval_tokens': 8192})
