"""An 8-expert top-2 MoE against the dense model of the same active parameters, on the
shakespeare_char recipe (experiments/configs/shakespeare_char.py), one after the other in one
process with the same data order:

  python -m experiments.benchmark.moe --workdir=runs/moe_benchmark
  python -m experiments.benchmark.moe --workdir=runs/moe_benchmark --config.dropless=true
  python -m experiments.benchmark.moe --workdir=runs/moe_quick \
      --config=experiments/configs/moe_benchmark.py:quick   # 200 steps each
      # 425 s at a load of 9-10 (108 CPU s)

- dense: attn*4 with SwiGLU width top_k x model.moe.d_ff = 344, the main job itself;
- moe:   attn:moe*4 with model.moe's 8 experts of width 172, top-2, capacity factor 1.25: per
         token the same 344 feed-forward width (plus a 128 x 8 router), four times the parameters;
- moe_dropless (dropless=True): the same MoE without capacity (grouped matmuls).
"""

from experiments.configs import base, shakespeare_char


def get_config(preset=''):
  c = shakespeare_char.get_config()
  c.model.moe.update(num_experts=8, top_k=2, d_ff=172, capacity_factor=1.25)
  c.dropless = False  # also train the MoE without capacity
  return base.with_preset(c, preset, quick={
      'train.num_steps': 200, 'train.eval_every': 100, 'train.checkpoint_every': 200})
