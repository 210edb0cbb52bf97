"""What each architecture can recall: MQAR across patterns x widths x number of pairs, on a CPU.

  python -m experiments.recall --workdir=runs/recall [--shard=i/n]
  python -m experiments.recall --workdir=runs/recall_sc --config.task.name=selective_copy
  python -m experiments.recall --workdir=runs/recall_m2 --config.sweep.patterns="('mamba2*2',)"
  python -m experiments.recall --workdir=runs/recall_quick \
      --config=experiments/configs/recall.py:quick   # attn*2 and mamba*2, 2 runs
      # 277 s at a load of 10 (72 CPU s)

Two-layer models (attention, Mamba, and a Mamba-then-attention hybrid) at d_model 32 and 64 learn
multi-query associative recall with 4 and 8 key-value pairs in rows of 32 tokens (vocabulary 32:
15 keys, 16 values), every pair queried once, 1,000 steps of 64 rows at lr 3e-3: 12 runs, about
13 minutes on a quiet 2-core CPU. The measured table and plots are in docs/recall.md.
"""

from ml_collections import ConfigDict

from experiments.configs import base


def get_config(preset=''):
  c = base.get_config()
  c.model.update(position='rope', norm='rmsnorm', activation='swiglu', dropout=0.0,
                 scan_layers=False, max_len=256)
  c.model.mamba.scan_impl = 'sequential'  # rows of 32: lax.scan is ~2x the associative scan here
  c.task = ConfigDict(dict(
      name='mqar',              # mqar | selective_copy (experiments/recall/tasks.py)
      vocab=32,                 # tokens; MQAR: keys 1..15, values 16..31
      seq_len=32,               # a row is seq_len + 1 tokens
      num_pairs=4,              # MQAR's key-value pairs (the sweep sets it)
      num_queries=0,            # MQAR's queries per row; 0: every pair is queried
      num_tokens=4,             # selective copying's tokens to copy (the sweep sets it)
      num_train=8192,           # training rows
      num_test=512,             # held-out rows (the accuracy)
      seed=0,
      tfds_data_dir='',         # where TFDS prepares the task; '' is TFDS's default
  ))
  c.data.update(tfds_name='recall', seq_len=32)  # the task's rows: data.seq_len = task.seq_len
  c.train.update(objective='experiments.recall.objective:Recall', num_steps=1000, batch_size=64, lr=3e-3, min_lr=3e-4,
                 warmup_steps=100, schedule='cosine', weight_decay=0.0, grad_clip=1.0,
                 steps_per_call=50, log_every=200, eval_every=0, eval_batch_size=512,
                 checkpoint_every=1000, keep_checkpoints=1)
  c.sweep = ConfigDict(dict(
      patterns=('attn*2', 'mamba*2', 'mamba,attn'),   # any registered mixers' block patterns
      widths=(32, 64),          # d_model
      head_dim=16,              # attention's num_heads = d_model / head_dim
      num_pairs=(4, 8),         # MQAR's pairs, or selective copying's tokens
      seq_lens=(32,),           # row lengths; each (num_pairs, seq_len) is one difficulty
      target=0.99,              # the accuracy a width must reach to count as solving it
  ))
  # Attention against Mamba at one width and difficulty.
  return base.with_preset(c, preset, quick={
      'train.num_steps': 300, 'train.checkpoint_every': 300, 'task.num_train': 2048,
      'sweep.patterns': ('attn*2', 'mamba*2'), 'sweep.widths': (32,), 'sweep.num_pairs': (4,)})
