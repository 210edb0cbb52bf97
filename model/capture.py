"""Attention weights of any run, layer by layer, without changing what normal training runs.

    probs = attention_weights(model, params, tokens_BxL)      # {layer: (B, H, L, L) float32}

Applying the model with the 'intermediates' collection mutable makes every attention layer take
its explicit-softmax path and sow its probabilities (model/attention.py); this collects them by
layer index, unstacking scanned runs (whose sown values carry a leading layer axis). Layers that
are not attention (Mamba, ...) have no entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from model import blocks
from model.attention import CAPTURE


def logits_and_attention(model, params, tokens_BxL: jnp.ndarray
                         ) -> tuple[jnp.ndarray, dict[int, jnp.ndarray]]:
  """(logits (B, L, V), {layer index: attention probabilities (B, H, L, L)})."""
  logits_BxLxV, state = model.apply({'params': params}, tokens_BxL, mutable=[CAPTURE])
  weights = {}
  for names, sown in traverse_util.flatten_dict(state.get(CAPTURE, {})).items():
    if names[-1] != 'attention_weights':
      continue
    run = next(n for n in names if blocks.run_layers(n) is not None)
    layers = blocks.run_layers(run)
    probs = sown[0]
    if len(layers) == 1 and probs.ndim == 4:
      weights[layers.start] = probs
    else:  # a scanned run: (count, B, H, L, L)
      for i in layers:
        weights[i] = probs[i - layers.start]
  return logits_BxLxV, dict(sorted(weights.items()))


def attention_weights(model, params, tokens_BxL: jnp.ndarray) -> dict[int, jnp.ndarray]:
  """{layer index: attention probabilities (B, H, L, L)}, query positions by key positions."""
  return logits_and_attention(model, params, tokens_BxL)[1]


def jit_attention_weights(model):
  """`attention_weights` compiled for `model`: fn(params, tokens_BxL) -> {layer: probs}."""
  return jax.jit(lambda params, tokens_BxL: attention_weights(model, params, tokens_BxL))
