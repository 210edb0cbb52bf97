"""Speculative decoding samples what the target samples; its caches roll back exactly."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.decode import Sampling, generate, init_cache, prefill
from model.speculative import speculative_generate
from model.speculative import rollback
from model import LM
from model.blocks import CACHE_STEPS
from tests.conftest import tiny


def setup(pattern, seed, vocab=16, **kw):
  """Large init_std makes a random model's distributions peaked and unlike another seed's, so a
  draft is often rejected and the residual matters."""
  model = LM(tiny(pattern=pattern, vocab_size=vocab, d_model=16, num_heads=2, d_ff=32,
                  init_std=0.5, **kw))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))
  return model, params['params']


@pytest.mark.parametrize('target_pattern,draft_pattern', [
    ('attn*2', 'mamba'), ('mamba*2', 'attn'), ('attn,mamba', 'mamba,attn')])
def test_greedy_equals_the_targets_own_greedy_output(target_pattern, draft_pattern):
  target, target_params = setup(target_pattern, 0)
  draft, draft_params = setup(draft_pattern, 1)
  prompt = jnp.array([[1, 2, 3, 4, 5]])
  greedy = Sampling(temperature=0.0)
  expected, _ = generate(target, target_params, prompt, jax.random.key(0), max_new_tokens=10,
                         sampling=greedy)
  tokens, new, drafted, accepted = speculative_generate(
      target, target_params, draft, draft_params, prompt, jax.random.key(0), max_new_tokens=10,
      num_draft=3, sampling=greedy)
  np.testing.assert_array_equal(tokens, expected)
  assert int(new[0]) == 10
  assert int(accepted) < int(drafted)  # rejections happened: the rollback was exercised


def test_a_draft_equal_to_the_target_accepts_everything_and_stops_at_the_end_token():
  model, params = setup('attn,mamba', 0)
  prompt = jnp.array([[1, 2, 3]])
  tokens, new, drafted, accepted = speculative_generate(
      model, params, model, params, prompt, jax.random.key(4), max_new_tokens=12, num_draft=3,
      sampling=Sampling(temperature=1.0))
  assert int(accepted) == int(drafted) == 9  # 3 rounds of 3 drafts + 1 bonus token
  assert int(new[0]) == 12
  # With an end token: generation stops there and the row repeats it, as `generate` does.
  eos = int(tokens[0, 3 + 5])
  cut, new, _, _ = speculative_generate(model, params, model, params, prompt, jax.random.key(4),
                                        max_new_tokens=12, num_draft=3,
                                        sampling=Sampling(temperature=1.0), eos_id=eos)
  first = 3 + list(np.asarray(tokens[0, 3:])).index(eos)
  np.testing.assert_array_equal(cut[0, :first + 1], tokens[0, :first + 1])
  assert (np.asarray(cut[0, first:]) == eos).all() and int(new[0]) == first - 2


def _chi_square_bound(dof: int, z: float = 4.5) -> float:
  """Wilson-Hilferty's chi-square quantile at a normal z (4.5: a false alarm about once in 3e5)."""
  return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_the_first_two_tokens_are_distributed_as_the_targets_samples():
  # Checked by hand once: with the residual max(0, p - q) replaced by p (q ignored), the
  # statistic was 1078 against a bound of about 60, and this test failed.
  vocab, n = 6, 4000
  target, target_params = setup('attn', 0, vocab=vocab)
  draft, draft_params = setup('mamba', 1, vocab=vocab)
  prompt = jnp.array([[1, 2, 3]])
  sampling = Sampling(temperature=1.0, top_k=5)

  @jax.jit
  def sample(keys):
    run = lambda key: speculative_generate(target, target_params, draft, draft_params, prompt,
                                           key, max_new_tokens=2, num_draft=2,
                                           sampling=sampling)[0][0, 3:]
    return jax.vmap(run)(keys)

  pairs = np.asarray(sample(jax.random.split(jax.random.key(0), n)))
  counts = np.zeros((vocab, vocab))
  np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)

  # The reference: the target's own next-token distributions, from full forward passes, with
  # top-k written again here: softmax over the 5 largest logits.
  def probs(logits_V):
    kept = np.argsort(logits_V)[-5:]
    p = np.zeros(vocab)
    p[kept] = np.exp(logits_V[kept] - logits_V[kept].max())
    return p / p.sum()

  first = probs(np.asarray(target.apply({'params': target_params}, prompt))[0, -1])
  second_inputs = jnp.concatenate([jnp.tile(prompt, (vocab, 1)),
                                   jnp.arange(vocab)[:, None]], axis=1)
  second_logits = np.asarray(target.apply({'params': target_params}, second_inputs))[:, -1]
  expected = n * first[:, None] * np.stack([probs(l) for l in second_logits])
  cells = expected > 5  # chi-square's approximation needs enough expected counts
  assert counts[~(expected > 0)].sum() == 0  # never a token the filters exclude
  stat = np.sum((counts[cells] - expected[cells]) ** 2 / expected[cells])
  assert stat < _chi_square_bound(int(cells.sum()) - 1), (stat, counts, expected)


def test_caches_after_a_rejection_equal_a_fresh_prefill_of_the_kept_tokens():
  model, params = setup('attn,mamba', 0, max_len=16)
  x = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]])  # x[:4] in the cache, then x[4:8] in one call
  size = 12

  @jax.jit
  def caches():
    _, cache = prefill(model, params, init_cache(model, 1, size), x[:, :4])
    _, state = model.apply({'params': params, 'cache': cache}, x[:, 4:], jnp.arange(4, 8)[None],
                           decode=True, mutable=['cache', CACHE_STEPS])
    kept = rollback(state['cache'], state[CACHE_STEPS], 2, 6)       # x[4], x[5] kept
    _, fresh = prefill(model, params, init_cache(model, 1, size), x[:, :6])
    return kept, fresh

  kept, fresh = caches()
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(kept), jax.tree.leaves(fresh)):
    name = jax.tree_util.keystr(path)
    if 'cached_' in name:  # slots past the index are stale, masked and overwritten
      a, b = a[:, :6], b[:, :6]
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)
  assert {jax.tree_util.keystr(p).split("'")[-2] for p, _ in
          jax.tree_util.tree_leaves_with_path(kept)} >= {'cache_index', 'ssm_state', 'conv_state'}
