"""Parameter and FLOP counts against hand-computed formulas and against the parameter tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import LM, count_params, training_flops_per_token
from tests.conftest import tiny


def hand_count(V, D, H, K, Dh, F, L, swiglu, untied, learned_len=0):
  """Parameters of the attn*L stack with RMSNorm, no biases, written out by hand."""
  attention = D * H * Dh + 2 * D * K * Dh + H * Dh * D       # q, k, v, out
  mlp = (3 if swiglu else 2) * D * F
  norms = 2 * D
  embedding = V * D * (2 if untied else 1) + learned_len * D
  return embedding, L * (attention + mlp + norms) + D         # + final norm


@pytest.mark.parametrize('kw', [
    dict(),
    dict(num_kv_heads=2, activation='gelu'),
    dict(num_kv_heads=1, tie_embeddings=False, position='learned', pattern='attn*3'),
])
def test_param_counts_equal_the_hand_formula_and_the_tree(kw):
  cfg = tiny(**kw)
  emb, non_emb = hand_count(
      V=61, D=32, H=4, K=cfg.kv_heads, Dh=8, F=64, L=cfg.num_layers,
      swiglu=cfg.activation == 'swiglu', untied=not cfg.tie_embeddings,
      learned_len=64 if cfg.position == 'learned' else 0)
  counts = count_params(cfg)
  assert (counts.embedding, counts.non_embedding) == (emb, non_emb)
  assert counts.total == emb + non_emb == counts.embedding + counts.active_non_embedding
  params = LM(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  assert counts.total == sum(np.size(x) for x in jax.tree.leaves(params))


def test_training_flops_per_token_formula():
  cfg = tiny(pattern='attn*3')
  n = count_params(cfg).non_embedding
  seq_len = 16
  # 6 x (N + the head's D x V) + 12 x T x H x Dh for each attention layer (PaLM, App. B).
  expected = 6 * (n + 32 * 61) + 3 * 12 * seq_len * 4 * 8
  assert training_flops_per_token(cfg, seq_len) == expected
  assert training_flops_per_token(cfg, 2 * seq_len) - expected == 3 * 12 * seq_len * 4 * 8
