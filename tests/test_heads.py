"""Head probes (eval/heads.py) against patterns whose scores are known: an exact copier, uniform
causal attention, a two-layer attention-only model with hand-set weights that implements an
induction circuit, and a unigram model, which learns nothing in context."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import heads
from model import LM, ModelConfig


def test_exact_copier_scores_one_and_uniform_attention_its_mean():
  P, L = 5, 10
  copier = np.zeros((1, 1, L, L))
  for i in range(L):  # the first copy attends to itself; the second to the token after the match
    copier[0, 0, i, i - P + 1 if i >= P else i] = 1.0
  assert np.isclose(float(heads.induction_scores(jnp.asarray(copier), P)[0]), 1.0)
  uniform = np.tril(np.ones((L, L))) / np.arange(1, L + 1)[:, None]
  expected = np.mean([1.0 / (i + 1) for i in range(P, 2 * P)])
  scores = heads.induction_scores(jnp.asarray(uniform[None, None]), P)
  assert np.isclose(float(scores[0]), expected)
  previous = np.eye(L, k=-1)
  previous[0, 0] = 1.0
  both = jnp.asarray(np.stack([previous, uniform])[None])          # (1, 2 heads, L, L)
  np.testing.assert_allclose(heads.previous_token_scores(both),
                             [1.0, np.mean([1.0 / (i + 1) for i in range(1, L)])], rtol=1e-6)


def induction_circuit(V: int, P: int):
  """A two-layer attention-only LM whose weights are set by hand (norms off, learned one-hot
  positions, two heads per layer, the second left at zero):
    layer 0, head 0  previous-token head: queries are position one-hots, keys the one-hot of
                     position + 1, so position i attends to i - 1; it writes the attended token
                     into a 'previous token' subspace of the residual stream
    layer 1, head 0  induction head (K-composition): queries are the current token, keys the
                     previous-token subspace, so i attends to j where token j - 1 == token i; it
                     writes token j into a 'prediction' subspace that the unembedding reads.
  Position 0, which has no previous token, is pushed out of layer 1's keys by a constant query
  direction (every token's one-hot sums to one) against a negative key on position 0."""
  L = 2 * P
  tok, pos, prev, pred = 0, V, V + L, 2 * V + L            # offsets of the four subspaces
  D, Dh, H = 3 * V + L, max(L, V + 1), 2
  cfg = ModelConfig(vocab_size=V, d_model=D, num_heads=H, head_dim=Dh, pattern='attn:none*2',
                    position='learned', max_len=L, norm='none', tie_embeddings=False,
                    scan_layers=False)
  model = LM(cfg)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, L), jnp.int32)))
  p = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)['params']
  sharp = 30.0 * np.sqrt(Dh)  # scores of 30 after the 1/sqrt(Dh) scaling: one-hot softmax
  for t in range(V):
    p['token_embedding'][t, tok + t] = 1.0
  for i in range(L):
    p['position_embedding'][i, pos + i] = 1.0
  a0, a1 = p['blocks']['layer_0']['mixer'], p['blocks']['layer_1']['mixer']
  for i in range(L):
    a0['query']['kernel'][pos + i, 0, i] = sharp
    if i + 1 < Dh:
      a0['key']['kernel'][pos + i, 0, i + 1] = 1.0
  for t in range(V):
    a0['value']['kernel'][tok + t, 0, t] = 1.0
    a0['out']['kernel'][0, t, prev + t] = 1.0
    a1['query']['kernel'][tok + t, 0, t] = sharp
    a1['query']['kernel'][tok + t, 0, V] = sharp            # the constant direction
    a1['key']['kernel'][prev + t, 0, t] = 1.0
    a1['value']['kernel'][tok + t, 0, t] = 1.0
    a1['out']['kernel'][0, t, pred + t] = 1.0
    p['lm_head'][t, pred + t] = 20.0
  a1['key']['kernel'][pos + 0, 0, V] = -2.0
  return model, jax.tree.map(jnp.asarray, p)


def test_hand_set_induction_circuit_scores_one():
  V, P, B = 10, 6, 4
  model, params = induction_circuit(V, P)
  rng = np.random.default_rng(0)
  half = np.stack([rng.permutation(V)[:P] for _ in range(B)])   # distinct tokens: one match each
  tokens = jnp.asarray(np.concatenate([half, half], axis=1), jnp.int32)
  scores = jax.jit(lambda p, t: heads.head_scores(model, p, t, P))(params, tokens)
  assert float(scores['induction'][1, 0]) > 0.999
  assert float(scores['previous_token'][0, 0]) > 0.999
  assert heads.strongest(scores['induction']) == (1, 0)
  assert heads.strongest(scores['previous_token']) == (0, 0)
  # the idle heads attend uniformly: their scores are the uniform pattern's
  uniform = np.mean([1.0 / (i + 1) for i in range(P, 2 * P)])
  assert np.isclose(float(scores['induction'][0, 1]), uniform, atol=1e-6)
  assert float(scores['second_copy_loss']) < 1e-3 < float(scores['first_copy_loss'])
  flat = heads.flat_metrics(scores)
  assert flat['max_induction_score'] == float(scores['induction'][1, 0])
  assert flat['induction/layer_1/head_0'] == flat['max_induction_score']
  # in context, the circuit predicts the second copy: loss late (second copy) < early (first)
  losses = heads.context_losses(model, params, tokens[:, :-1], tokens[:, 1:])
  assert float(heads.icl_score(losses, early=2, late=2 * P - 3)) < -1.0


def test_icl_score_of_a_unigram_model_is_zero():
  V, L = 7, 64
  log_p = jnp.log(jax.nn.softmax(jnp.arange(V, dtype=jnp.float32)))
  sequence = np.random.default_rng(1).integers(0, V, L + 1)
  # every rotation of one sequence: each position sees the same tokens, in other contexts
  contexts = jnp.asarray(np.stack([np.roll(sequence, r) for r in range(L + 1)]), jnp.int32)
  unigram_logits = jnp.broadcast_to(log_p, (*contexts.shape, V))   # ignores its context
  losses = heads.next_token_losses(unigram_logits, contexts)
  early, late = heads.icl_positions(L)
  assert (early, late) == (5, 61)   # 64 x 50 / 512 = 6.25 -> the 6th; 62.5 -> the 62nd (even)
  assert abs(float(heads.icl_score(losses, early, late))) < 1e-5
  assert heads.icl_positions(512) == (49, 499)      # Olsson et al.'s 50th and 500th tokens
  assert heads.icl_positions(128) == (11, 124)
  # One context whose tokens are all 3 but for the targets of the early and the late position,
  # tokens 6 and 62 of 0..64 (a loss at index t predicts token t + 1): 6, the likeliest, and 0,
  # the least likely. With logits 0..6, log p(k) - log p(j) = k - j, so the late loss exceeds
  # the early one by 6 - 0: a score read one position off sees two 3s and gives 0.
  row = np.full((1, L + 1), 3)
  row[0, 6], row[0, 62] = 6, 0
  row = jnp.asarray(row, jnp.int32)
  losses = heads.next_token_losses(jnp.broadcast_to(log_p, (*row.shape, V)), row)
  assert float(heads.icl_score(losses, early, late)) == pytest.approx(6.0, abs=1e-5)
