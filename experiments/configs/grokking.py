"""The default grokking run: the fastest setting found that still shows the phenomenon clearly
on a 2-core CPU. Measured steps and wall time are in docs/grokking.md.

  python -m experiments.grokking --workdir=runs/grokking
  python -m experiments.grokking --workdir=runs/grokking_sweep --sweep
  python -m experiments.grokking --workdir=runs/grokking_quick \
      --config=experiments/configs/grokking.py:quick   # 50% of the table: 92 s at a load of 8-11

Nanda et al.'s recipe (experiments/configs/grokking_nanda2023.py) made cheaper where it does not
change the story: a + b mod 59 rather than 113 (3,481 equations rather than 12,769), 40% of them
for training, width 64 (4 heads, MLP 256), and lr 1e-2 rather than 1e-3, so that weight decay
(AdamW's lr x weight_decay shrinkage per step) pulls the memorising solution apart ten times
sooner. The model memorises by step ~60 and generalises between steps ~400 and ~1200 depending
on the seeds (seeds 0-3: 660, 400, 460, 1150), always more than 5x later. With less data it
generalises later (35%: step 1290), with more almost as soon as it memorises (50%: 250, 80%: 80;
the --sweep).
"""

from ml_collections import ConfigDict

from experiments.configs import base


def get_config(preset=''):
  c = ConfigDict()
  c.task = ConfigDict(dict(
      operation='add',          # add | sub | div | x2_xy_y2 | s5 (experiments/arithmetic.py)
      prime=59,                 # p of the modular operations (s5 ignores it)
      train_fraction=0.4,       # share of the table's equations used for training
      seed=0,                   # of the train / validation split
      tfds_data_dir='',         # where TFDS prepares the table; '' is TFDS's default
  ))
  # Nanda et al.'s one-layer shape: learned positions, no norm, ReLU MLP, untied head.
  # vocab_size 0: the task's elements plus '='. Attention over 3 positions as elementwise
  # products: 0.92x the step time of batched matmuls on CPU (BENCHMARKS.md).
  c.model = base.model_config(d_model=64, num_heads=4, d_ff=256, pattern='attn*1',
                              position='learned', max_len=3, norm='none', activation='relu',
                              use_bias=True, tie_embeddings=False, init_std=64 ** -0.5,
                              scan_layers=False, attention_impl='elementwise')
  c.train = ConfigDict(dict(
      num_steps=5000,           # the budget; a run stops earlier once it has generalised
      stop_after_grok=1.25,     # stop at this x the step validation accuracy reached 99%
      lr=1e-2,
      warmup_steps=10,
      schedule='constant',      # after the linear warmup (cosine | linear | constant)
      min_lr=0.0,
      b1=0.9,
      b2=0.98,
      eps=1e-8,
      weight_decay=1.0,         # AdamW's decoupled decay: what makes the model generalise
      weight_decay_exclude=('scale', 'bias'),
      grad_clip=0.0,            # 0 disables
      seed=0,                   # of the initialisation
      eval_every=10,            # steps between evaluations (whole splits; metrics.jsonl rows)
      steps_per_call=100,       # steps per compiled call: a multiple of eval_every
  ))
  c.grokfast = ConfigDict(dict(enabled=False, alpha=0.98, lamb=2.0))  # train/grokfast.py
  # --sweep: one run per (weight decay, train fraction), each with the settings above.
  c.sweep = ConfigDict(dict(train_fractions=(0.35, 0.4, 0.5, 0.6, 0.8), weight_decays=(1.0, 2.0)))
  # More of the table to learn from: it generalises at step ~250 rather than ~660.
  return base.with_preset(c, preset, quick={'task.train_fraction': 0.5, 'train.num_steps': 1000})
