"""Grokfast (Lee et al. 2024): amplify the slow part of the gradient to grok sooner.

The gradient's exponential moving average h is a low-pass filter of its sequence over steps;
Grokfast-EMA adds it back, amplified, before the optimizer sees the gradient:

    h_0 = g_0                           (the filter starts from the first gradient, as the paper's code)
    h_t = alpha * h_{t-1} + (1 - alpha) * g_t
    g~_t = g_t + lamb * h_t

As an optax transformation it goes between clipping and AdamW:
`train.optim.make_optimizer(tc, gradient_filter=grokfast_ema(0.98, 2.0))`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class GrokfastState(NamedTuple):
  count: jax.Array   # int32 scalar: gradients seen
  ema: optax.Params  # h, shaped like the gradients


def grokfast_ema(alpha: float = 0.98, lamb: float = 2.0) -> optax.GradientTransformation:
  """Grokfast-EMA with decay `alpha` (the filter's window is about 1 / (1 - alpha) steps) and
  amplification `lamb`; the paper's defaults for modular arithmetic are 0.98 and 2.0."""
  if not 0.0 <= alpha < 1.0:
    raise ValueError(f'Grokfast alpha must be in [0, 1), got {alpha}')
  if lamb < 0.0:
    raise ValueError(f'Grokfast lamb must be >= 0, got {lamb}')

  def init(params):
    return GrokfastState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    del params
    first = state.count == 0
    ema = jax.tree.map(lambda h, g: jnp.where(first, g, alpha * h + (1.0 - alpha) * g),
                       state.ema, grads)
    filtered = jax.tree.map(lambda g, h: g + lamb * h, grads, ema)
    return filtered, GrokfastState(state.count + 1, ema)

  return optax.GradientTransformation(init, update)
