"""Needle in a haystack: a small run trained on pass-key probes of 64 characters, then probed at
each (depth, length), training length and beyond.

  python -m experiments.needle --workdir=runs/needle
  python -m experiments.needle --workdir=DIR --probe_only      # probe a run already in DIR
  python -m experiments.needle --workdir=runs/needle_quick \
      --config=experiments/configs/needle.py:quick   # 300 steps, 2 lengths: 93 s at a load of 8-11

Two RoPE attention layers of width 64 are trained to find ' The pass key is #482. ' in tiny
shakespeare and copy its digits after the question (experiments/needle/haystack.py). Measured
on a 2-core CPU (docs/long_context.md): 5.4 minutes, and this budget does NOT learn the
retrieval (the digits stay at chance); the heat map is then all zeros.
"""

from ml_collections import ConfigDict

from experiments.configs import base


def get_config(preset=''):
  c = base.get_config()
  c.model.update(d_model=64, num_heads=4, d_ff=172, pattern='attn*2', position='rope',
                 norm='rmsnorm', activation='swiglu', max_len=64, scan_layers=False)
  # The probes as a TFDS catalog dataset generated in process; seq_len is its documents' length.
  c.data.update(tfds_name='needle_haystack/len64', tokenizer='char', seq_len=64)
  c.train.update(num_steps=3000, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=100,
                 schedule='cosine', b2=0.99, weight_decay=0.1, grad_clip=1.0, steps_per_call=50,
                 log_every=100, eval_every=0, eval_batches=4, eval_batch_size=32,
                 checkpoint_every=3000, keep_checkpoints=1)
  c.probe = ConfigDict(dict(
      lengths=(64, 128, 256, 512),         # probe lengths in characters (trained at 64)
      depths=(0.0, 0.25, 0.5, 0.75, 1.0),  # where the needle sits between start and question
      num=32,                              # probes per cell
      seed=0,
  ))
  return base.with_preset(c, preset, quick={
      'train.num_steps': 300, 'train.checkpoint_every': 300, 'probe.lengths': (64, 128),
      'probe.depths': (0.0, 0.5, 1.0), 'probe.num': 8})
