"""Dense feed-forward: GELU or ReLU MLP (D -> F -> D) or SwiGLU (Shazeer 2020: silu(xW) * xV)."""

from __future__ import annotations

import flax.linen as nn

from model.registry import Layer, register_ffn
from model.layers import activation, dense, output_std

ACT_BLF = ('activation_batch', 'activation_length', 'activation_mlp')


@register_ffn('mlp')
class MLP(Layer):

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.config
    F = cfg.ff_width
    act = activation(cfg.activation)
    if cfg.activation == 'swiglu':
      h_BxLxF = (act(dense(cfg, F, ('embed', 'mlp'), 'wi_gate')(x_BxLxD))
                 * dense(cfg, F, ('embed', 'mlp'), 'wi_up')(x_BxLxD))
    else:
      h_BxLxF = act(dense(cfg, F, ('embed', 'mlp'), 'wi')(x_BxLxD))
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ACT_BLF)
    return dense(cfg, cfg.d_model, ('mlp', 'embed'), 'wo', std=output_std(cfg))(h_BxLxF)
