"""Nanda et al. 2023, "Progress measures for grokking via mechanistic interpretability".

  python -m experiments.grokking --config=experiments/configs/grokking_nanda2023.py \
      --workdir=runs/grokking_nanda2023
  python -m experiments.grokking --config=experiments/configs/grokking_nanda2023.py:quick \
      --workdir=runs/nanda_quick   # memorisation only, 1,000 steps
      # 143 s at a load of 4-6 (135 CPU s; memorised at step 200, validation accuracy 1.6%)

a + b mod 113, 30% of the 12,769 pairs for training (seeded split), input tokens `a b =`, loss on
the answer only. One transformer layer: width 128, 4 heads of 32, ReLU MLP of 512, learned
positions, no LayerNorm, untied embedding and unembedding, initialised with std 1/sqrt(128) as
the paper's code (which uses 1/sqrt(114) for the unembedding; here the projections into the
residual stream use GPT-2's 1/sqrt(2 x layers) smaller std, as every model of this codebase).
Full-batch AdamW, lr 1e-3 after 10 warmup steps, weight decay 1.0, betas (0.9, 0.98), no
gradient clipping. The paper's model memorises within about 1k steps and generalises near 10k;
it trained 40k steps, this run stops at 1.25 x the step it generalises.

Differences from the paper's code: biases on every projection (the paper has them in the MLP
only) and none of them decayed, and the unembedding also scores the '=' token (as the paper's
first version did). Measured steps and wall time are in docs/grokking.md.
"""

from ml_collections import ConfigDict

from experiments.configs import base, grokking


def get_config(preset=''):
  c = grokking.get_config()
  c.task.update(operation='add', prime=113, train_fraction=0.3, seed=0)
  c.model.update(d_model=128, num_heads=4, d_ff=512, init_std=128 ** -0.5)
  c.train.update(num_steps=40_000, lr=1e-3, warmup_steps=10, weight_decay=1.0, b1=0.9, b2=0.98,
                 eval_every=100, steps_per_call=1000, stop_after_grok=1.25)
  c.sweep = ConfigDict(dict(train_fractions=(0.3, 0.5, 0.7), weight_decays=(1.0,)))
  # The first 1,000 steps: memorised by step ~200, validation accuracy still low (it generalises
  # near step 10,000: the default's 8.5 minutes).
  return base.with_preset(c, preset, quick={'train.num_steps': 1000})
