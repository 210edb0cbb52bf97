"""nanoGPT's CPU recipe on tiny shakespeare, character level: the main job.

  python -m train --config=experiments/configs/shakespeare_char.py --workdir=/tmp/shakespeare
  python -m train --config=experiments/configs/shakespeare_char.py:quick --workdir=/tmp/quick
      # 300 steps: 111 s at a load of 3-8

4 layers, 4 heads, width 128, context 64, batch 12, 2000 steps of AdamW (lr 1e-3, 100 warmup steps,
cosine to 1e-4, beta2 0.99), no dropout. nanoGPT reports validation loss ~1.88 for this shape on a
laptop CPU in ~3 minutes; the measured figure for this config is in the README. The blocks are
RoPE, RMSNorm and SwiGLU (F = 344 keeps the MLP at nanoGPT's 4 * 128 * 128 * 2 parameters).

The corpus is ../shared/data/tinyshakespeare/input.txt; elsewhere, the TFDS catalog's
tiny_shakespeare is used (downloaded when online).
"""

from experiments.configs import base


def get_config(preset=''):
  c = base.get_config()
  c.model.update(d_model=128, num_heads=4, d_ff=344, pattern='attn*4', position='rope',
                 norm='rmsnorm', activation='swiglu', dropout=0.0, scan_layers=False)
  c.data.update(path=base.TINY_SHAKESPEARE, tfds_fallback='tiny_shakespeare', tokenizer='char',
                seq_len=64)
  c.train.update(num_steps=2000, batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100,
                 schedule='cosine', b2=0.99, weight_decay=0.1, grad_clip=1.0,
                 steps_per_call=25, log_every=25, eval_every=250, eval_batches=8,
                 checkpoint_every=500)
  return base.with_preset(c, preset, quick={
      'train.num_steps': 300, 'train.eval_every': 100, 'train.checkpoint_every': 300})
