"""Scaling laws on an accelerator: 6 transformer sizes x 4 token budgets on lm1b (24 runs).

  python -m experiments.scaling --workdir=gs://.../scaling_lm1b \
      --config=experiments/configs/scaling_tpu.py
  # n hosts (or n single-device processes) share the grid:  ... --shard=i/n
  # on NVIDIA GPUs:  ... --config.model.attention_impl=cudnn
  # the grid with every run's N, D and FLOPs, without training:  ... --dry_run

Depths 4..14 at d_model = 64 x depth (head width 64): N from 4.2M to 180M non-embedding parameters
(43x). Budgets of 2^27..2^30 tokens (134M to 1.07B; lm1b's training split is about 1B unigram
tokens, so no run repeats data), batches of 128 x 512 tokens, each run's cosine schedule over its
own budget. bfloat16 compute, float32 parameters, layers scanned.

Cost (the dry run prints it): 5.7e18 training FLOPs (C = model.training_flops_per_token x D,
attention and the output head included; the final evaluations on the test split add ~1%). At 40%
of a chip's dense bf16 peak that is about 4 hours on one H100 (989 TFLOP/s), 15 chip-hours of
TPU v4 (275 TFLOP/s) or 20 of TPU v5e (197 TFLOP/s); preparing the corpus once (unigram tokenizer,
tokenizing lm1b) adds host CPU time on top.

Checked against the TPU compiler (docs/tpu.md; compiled on a CPU, not run):
  python -m experiments.scaling --workdir=DIR --config=experiments/configs/scaling_tpu.py \
      --dry_run --compile_for=v5e:4x4
On a v5e-16 (data parallel, 8 sequences of 512 a chip) every run fits: 0.70 GiB a chip at depth
4 to 9.65 GiB at depth 14, of the 15.75 the compiler may use. Its roofline estimate (each
instruction at the chip's peak or its HBM bandwidth; real steps are slower) is 3.9 ms a step at
depth 4 (MFU 23%) to 75.5 ms at depth 14 (MFU 33%): 25.2 chip-hours for the grid, 1.6 hours on
the 16 chips, an average MFU of 32%, so the 20 chip-hours above (40%) is optimistic; plan on 25
or more. The compiles take 1-5 minutes each on a 2-core CPU (one a depth).
"""

from ml_collections import ConfigDict

from experiments.configs import base


def get_config(preset=''):
  c = base.get_config()
  c.model.update(position='rope', norm='rmsnorm', activation='swiglu', dropout=0.0,
                 dtype='bfloat16', scan_layers=True)
  c.data.update(path='', tfds_name='lm1b', text_key='text', val_split='test',
                tokenizer='unigram', vocab_size=8192, seq_len=512)
  c.train.update(batch_size=128, lr=1e-3, min_lr=1e-4, warmup_steps=256, schedule='cosine',
                 b2=0.95, weight_decay=0.1, grad_clip=1.0, steps_per_call=32, log_every=256,
                 eval_every=0, eval_batch_size=256, checkpoint_every=1024, keep_checkpoints=1)
  c.sweep = ConfigDict(dict(
      pattern='attn*{depth}',
      depths=(4, 6, 8, 10, 12, 14),
      aspect_ratio=64,
      head_dim=64,
      tokens=(2 ** 27, 2 ** 28, 2 ** 29, 2 ** 30),
      max_flops=0.0,
  ))
  return base.with_preset(c, preset)  # no quick preset: --dry_run sizes the grid
