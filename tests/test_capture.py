"""Capturing attention weights (model/capture.py): the same logits, probabilities that are causal
and sum to one, every attention layer scanned or not, and the fused path when not capturing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import LM, capture
from tests.conftest import tiny


def init(cfg, length=12):
  model = LM(cfg)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, length), jnp.int32))
  return model, nn.unbox(variables)['params']


@pytest.mark.parametrize('overrides', [
    dict(scan_layers=True, num_kv_heads=2, attention_window=5),
    dict(scan_layers=False, pattern='mamba,attn:none', position='alibi'),
])
def test_capture_keeps_logits_and_gives_causal_distributions(overrides):
  cfg = tiny(**overrides)
  model, params = init(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  plain = jax.jit(model.apply)({'params': params}, tokens)
  logits, weights = jax.jit(lambda p, t: capture.logits_and_attention(model, p, t))(params,
                                                                                    tokens)
  np.testing.assert_allclose(logits, plain, atol=1e-5, rtol=1e-5)
  attention_layers = [i for i, (mixer, _) in enumerate(cfg.layers) if mixer == 'attn']
  assert sorted(weights) == attention_layers
  L = tokens.shape[1]
  offset = np.arange(L)[:, None] - np.arange(L)[None, :]
  window = cfg.attention_window or L + 1
  for probs in weights.values():
    probs = np.asarray(probs)
    assert probs.shape == (2, cfg.num_heads, L, L)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.all(probs[..., (offset < 0) | (offset >= window)] == 0.0)
    assert np.all(probs[..., (offset >= 0) & (offset < window)] > 0.0)
  # scanned or not, the layers' weights are the same function of the parameters
  if cfg.scan_layers:
    unscanned = LM(cfg.replace(scan_layers=False))
    stacked = params['blocks']['layers_0_to_1']
    per_layer = {f'layer_{i}': jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(2)}
    again = capture.attention_weights(unscanned, dict(params, blocks=per_layer), tokens)
    for i in range(2):
      np.testing.assert_allclose(again[i], weights[i], atol=1e-6)


def test_fused_attention_only_when_not_capturing(monkeypatch):
  cfg = tiny(scan_layers=False, pattern='attn:none')
  model, params = init(cfg)
  calls = []
  fused = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, 'dot_product_attention',
                      lambda *a, **k: calls.append(1) or fused(*a, **k))
  tokens = jnp.zeros((1, 6), jnp.int32)
  jax.eval_shape(lambda p: model.apply({'params': p}, tokens), params)  # traces, runs nothing
  assert len(calls) == cfg.num_layers
  jax.eval_shape(lambda p: capture.attention_weights(model, p, tokens), params)
  assert len(calls) == cfg.num_layers  # the explicit softmax ran instead
