"""The language model: token embedding (+ absolute positions) -> block stack -> norm -> logits.

    model = LM(cfg)
    variables = model.init(key, tokens_BxL)
    logits_BxLxV = model.apply(variables, tokens_BxL)                      # float32

Cached decoding: `init` with `decode=True` on a (B, S) input creates caches of length S; then each
`apply(..., decode=True, mutable=['cache'])` feeds the next T tokens with their positions.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from model import positions as pos_lib
from model.blocks import Stack
from model.config import ModelConfig
from model.layers import (ACT_BLD, ACT_BLV, Norm, compute_dtype, normal, param_init,
                          projection_dot)


class LM(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, *, decode: bool = False,
               deterministic: bool = True, last_only: bool = False, head: str = 'logits'):
    """Logits (B, L, V) in float32; with `last_only`, logits of the last position only (B, 1, V),
    which is all that sampling and answer-only losses need. With head='scalar', one float32
    score per position (B, L) from a linear head on the final hidden state instead (a reward
    model's), its parameters 'scalar_head' created by the first such call; with head='both',
    (logits, scores): a policy and its value function on one trunk (PPO)."""
    cfg = self.config
    dtype = compute_dtype(cfg)
    B, L = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))

    embedding = self.param('token_embedding', param_init(normal(cfg.init_std), ('vocab', 'embed')),
                           (cfg.vocab_size, cfg.d_model), jnp.float32)
    x_BxLxD = jnp.take(nn.with_logical_constraint(embedding, ('vocab', None)), tokens_BxL,
                       axis=0).astype(dtype)
    if cfg.position == 'learned':
      table = self.param('position_embedding',
                         param_init(normal(cfg.init_std), ('position', 'embed')),
                         (cfg.max_len, cfg.d_model), jnp.float32)
      x_BxLxD = x_BxLxD + jnp.take(table, positions_BxL, axis=0).astype(dtype)
    elif cfg.position == 'sinusoidal':
      x_BxLxD = x_BxLxD + pos_lib.sinusoidal(positions_BxL, cfg.d_model).astype(dtype)
    x_BxLxD = nn.Dropout(cfg.dropout)(x_BxLxD, deterministic=deterministic)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ACT_BLD)

    x_BxLxD = Stack(cfg, decode=decode, deterministic=deterministic, last_only=last_only,
                    name='blocks')(x_BxLxD, positions_BxL)
    x_BxLxD = Norm(cfg, name='final_norm')(x_BxLxD)

    if head not in ('logits', 'scalar', 'both'):
      raise ValueError(f'head={head!r}: choose logits, scalar or both')
    if head in ('scalar', 'both'):
      kernel_D = self.param('scalar_head', param_init(normal(cfg.init_std), ('embed',)),
                            (cfg.d_model,), jnp.float32)
      bias = self.param('scalar_head_bias', param_init(nn.initializers.zeros, ()), (),
                        jnp.float32)
      scores_BxL = jnp.einsum('bld,d->bl', x_BxLxD.astype(jnp.float32), kernel_D) + bias
      if head == 'scalar':
        return scores_BxL
    if cfg.tie_embeddings:
      head_VxD = embedding
    else:
      head_VxD = self.param('lm_head', param_init(normal(cfg.init_std), ('vocab', 'embed')),
                            (cfg.vocab_size, cfg.d_model), jnp.float32)
    logits_BxLxV = projection_dot(x_BxLxD, head_VxD.astype(dtype).T, (((2,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    logits_BxLxV = nn.with_logical_constraint(logits_BxLxV, ACT_BLV)
    return (logits_BxLxV, scores_BxL) if head == 'both' else logits_BxLxV
