"""Induction heads and in-context learning (Elhage et al. 2021; Olsson et al. 2022) on a CPU.

  python -m experiments.induction --workdir=runs/induction
  python -m experiments.induction --workdir=runs/induction_hybrid \
      --config.patterns='attn:none*2|mamba*2|mamba,attn'   # '|' between models
  python -m experiments.induction --workdir=runs/induction_quick \
      --config=experiments/configs/induction.py:quick   # 1,200 steps
      # 356 s at a load of 10-11 (123 CPU s)

One-layer and two-layer attention-only models (`attn:none`, `attn:none*2`: no MLPs; width 64, 8
heads) on tiny shakespeare mixed with lines of repeated random segments, 75% of the characters
(experiments/induction/corpus.py), character level, context 64, 2000 steps. Every 50 steps each
model's heads are scored on 64 sequences of 16 random characters repeated twice and its ICL score
is measured on 256 held-out contexts (experiments/induction/probe.py). The two-layer model's
induction head forms at step ~1000 (seeds 0-3: 1000, 1150, 1050, 950); the whole command took
2.5 minutes on the shared 2-core CPU at a load of 6 (6 at a load of 8.6). Measured figures and
plots: docs/induction.md.
"""

from ml_collections import ConfigDict

from experiments.configs import base


def get_config(preset=''):
  c = base.get_config()
  c.patterns = 'attn:none,attn:none*2'   # models to train; model.pattern is set from each
  c.model.update(d_model=64, num_heads=8, pattern='attn:none*2', position='rope', norm='rmsnorm',
                 dropout=0.0, scan_layers=False)
  c.data.update(path='', tokenizer='char', seq_len=64)  # path: the corpus written in DIR
  c.corpus = ConfigDict(dict(
      text_path=base.TINY_SHAKESPEARE,  # the natural text
      synthetic_fraction=0.75,  # share of the corpus's characters that are repeated segments
      min_len=8,                # segment lengths, in characters
      max_len=24,
      repeats=3,                # copies of a segment on its line
      seed=0,
  ))
  c.train.update(num_steps=2000, batch_size=32, lr=1e-2, min_lr=1e-2, warmup_steps=50,
                 schedule='constant', weight_decay=0.1, grad_clip=1.0, steps_per_call=50,
                 log_every=50, eval_every=50, eval_batches=4, eval_batch_size=64,
                 checkpoint_every=2000, keep_checkpoints=1)
  c.probe = ConfigDict(dict(
      period=16,                # random tokens repeated in the probe sequences; 0: seq_len / 2
      num_sequences=64,
      num_contexts=256,         # held-out contexts of the ICL score (each of its two)
      seed=0,
      threshold=0.5,            # max induction score that marks the phase change
      draw_period=16,           # the repeated sequence the heads are drawn on
  ))
  # The two-layer model's phase change (step ~1000) and a little after; fewer, smaller probes.
  return base.with_preset(c, preset, quick={
      'train.num_steps': 1200, 'train.eval_every': 100, 'train.checkpoint_every': 1200,
      'probe.num_sequences': 32, 'probe.num_contexts': 64})
