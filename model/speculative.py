"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes K
tokens, the target model scores all of them in one cached call, and rejection sampling keeps a
prefix of them plus one token of the target's own, so that the output is distributed exactly as
the target's samples (and is its greedy output, token for token, at temperature 0).

One round, with n tokens x[:n] committed and both caches holding x[:n-1]:
  draft   K + 1 one-token steps feed x[n-1], d_1, ..., d_K, drawing d_i ~ q_i (the last step only
          puts d_K into the draft's cache, for when every draft is accepted);
  target  one call over x[n-1], d_1, ..., d_K gives p_1, ..., p_{K+1};
  accept  d_i while u_i < p_i(d_i) / q_i(d_i); at the first rejection i draw from
          max(0, p_i - q_i) normalised, and when all K are accepted draw a bonus token from
          p_{K+1}; at temperature 0 p and q are one-hot, so d_i is kept while it is the target's
          argmax, and the target's argmax follows;
  rollback both caches to x[:n+a] (a drafts accepted).

Rolling a cache back is exact for every layer. Attention's keys and values sit in slots addressed
by position: setting the cache index back is enough (slots past it are masked and overwritten).
A recurrent layer (Mamba) cannot undo a step, so every call here makes the 'cache_steps'
collection mutable, in which it writes its state after each position of the call
(model/blocks.py: CACHE_STEPS); the rollback takes the state after the last kept position. That
state is the recurrence's own (the same float32 step as a one-token call), not a recomputation,
and it costs one (Din, N) state per drafted position. A cache holding anything else (MoE's expert
slots) is refused with a clear error rather than rolled back approximately.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import traverse_util

from model.decode import Sampling, filter_logits, init_cache, prefill, sample_logits
from model import LM
from model.blocks import CACHE_STEPS
from model.config import ConfigError

_INDEX = 'cache_index'                        # attention: where the next keys are written
_BY_POSITION = ('cached_key', 'cached_value')  # attention: slot s holds position s


def rollback(cache, steps, kept, length):
  """The cache after the first `kept` (>= 1, traced) positions of the call that returned `cache`
  and `steps` (its CACHE_STEPS, position on the last axis), which then holds `length` tokens."""
  flat_steps = traverse_util.flatten_dict(steps) if steps else {}

  def restore(path, leaf):
    if path in flat_steps:
      return jax.lax.dynamic_index_in_dim(flat_steps[path], kept - 1, axis=-1, keepdims=False)
    if path[-1] == _INDEX:
      return jnp.full_like(leaf, length)
    if path[-1] in _BY_POSITION:
      return leaf
    raise ConfigError(f'speculative decoding cannot roll back the decoding state '
                      f'{"/".join(path)}: only attention and Mamba layers (no MoE) are supported')

  flat = traverse_util.flatten_dict(cache)
  return traverse_util.unflatten_dict({path: restore(path, leaf) for path, leaf in flat.items()})


@functools.partial(jax.jit, static_argnames=('target', 'draft', 'max_new_tokens', 'num_draft',
                                             'sampling', 'eos_id'))
def speculative_generate(target: LM, target_params, draft: LM, draft_params, prompt_BxT, rng, *,
                         max_new_tokens: int, num_draft: int = 4,
                         sampling: Sampling = Sampling(), eos_id: int | None = None):
  """(tokens (1, T + max_new_tokens), new tokens (1,), drafted, accepted): what `generate` returns
  for the target (the same distribution; at temperature 0 the same tokens), plus how many tokens
  the draft proposed (num_draft per round) and how many of them the target accepted.

  Batch size 1 only: rows accept different numbers of drafts, and attention's cache index is one
  per batch, so a batch would need per-row cache positions. Both models must share the vocabulary
  and fit T + max_new_tokens + num_draft positions in their caches (positions past the end are
  clamped: those tokens are never kept)."""
  B, T = prompt_BxT.shape
  K = num_draft
  if B != 1:
    raise ConfigError(f'speculative decoding takes one sequence (batch 1), got a batch of {B}')
  if K < 1:
    raise ConfigError(f'num_draft must be >= 1, got {K}')
  if target.config.vocab_size != draft.config.vocab_size:
    raise ConfigError(f'the draft\'s vocabulary ({draft.config.vocab_size}) differs from the '
                      f'target\'s ({target.config.vocab_size})')
  total = T + max_new_tokens
  size = total + K + 1
  fill = 0 if eos_id is None else eos_id
  tokens = jnp.full((size,), fill, jnp.int32).at[:T].set(prompt_BxT[0].astype(jnp.int32))
  caches = []
  for model, params in ((target, target_params), (draft, draft_params)):
    cache = init_cache(model, 1, size)
    if T > 1:  # the last prompt token is fed by the first round
      _, cache = prefill(model, params, cache, prompt_BxT[:, :T - 1])
    caches.append(cache)

  def call(model, params, cache, tokens_L, start):
    L = tokens_L.shape[0]
    positions_1xL = jnp.minimum(start + jnp.arange(L, dtype=jnp.int32), total - 1)[None]
    logits, state = model.apply({'params': params, 'cache': cache}, tokens_L[None], positions_1xL,
                                decode=True, mutable=['cache', CACHE_STEPS])
    return logits[0], state['cache'], state.get(CACHE_STEPS, {})

  def keep_going(carry):
    n, _, _, _, _, done, _, _ = carry
    return (n < total) & ~done

  def one_round(carry):
    n, tokens, target_cache, draft_cache, rng, done, drafted, accepted = carry
    rng, draft_key, accept_key, last_key = jax.random.split(rng, 4)

    def draft_step(state, inputs):
      cache, token = state
      i, key = inputs
      logits_1xV, cache, steps = call(draft, draft_params, cache, token[None], n - 1 + i)
      proposed = sample_logits(logits_1xV, key, sampling)[0]
      return (cache, proposed), (logits_1xV[0], proposed, steps)

    (draft_cache, _), (q_logits_Kp1xV, drafts_Kp1, draft_steps) = jax.lax.scan(
        draft_step, (draft_cache, tokens[n - 1]),
        (jnp.arange(K + 1), jax.random.split(draft_key, K + 1)))
    drafts_K = drafts_Kp1[:K]
    # One-token steps stacked on a leading axis -> the position axis last, as one call writes it.
    draft_steps = jax.tree.map(lambda s: jnp.moveaxis(s[..., 0], 0, -1), draft_steps)

    p_logits_Kp1xV, target_cache, target_steps = call(
        target, target_params, target_cache,
        jnp.concatenate([tokens[n - 1][None], drafts_K]), n - 1)

    if sampling.temperature == 0:
      best_Kp1 = jnp.argmax(p_logits_Kp1xV, axis=-1).astype(jnp.int32)
      ok_K = drafts_K == best_Kp1[:K]
      a = jnp.sum(jnp.cumprod(ok_K))
      last = best_Kp1[a]
    else:
      p_Kp1xV = jax.nn.softmax(filter_logits(p_logits_Kp1xV, sampling), axis=-1)
      q_KxV = jax.nn.softmax(filter_logits(q_logits_Kp1xV[:K], sampling), axis=-1)
      rows = jnp.arange(K)
      u_K = jax.random.uniform(accept_key, (K,))
      ok_K = u_K * q_KxV[rows, drafts_K] < p_Kp1xV[rows, drafts_K]   # u < p / q
      a = jnp.sum(jnp.cumprod(ok_K))
      # Row K of q is zero: after K acceptances the residual is p_{K+1} itself (the bonus).
      q_Kp1xV = jnp.concatenate([q_KxV, jnp.zeros_like(q_KxV[:1])])
      residual_V = jnp.maximum(p_Kp1xV[a] - q_Kp1xV[a], 0.0)
      residual_V = jnp.where(jnp.sum(residual_V) > 0, residual_V, p_Kp1xV[a])  # p == q: any
      last = jax.random.categorical(last_key, jnp.log(residual_V)).astype(jnp.int32)

    kept_Kp1 = jnp.arange(K + 1) <= a
    chunk_Kp1 = jnp.where(jnp.arange(K + 1) < a, jnp.concatenate([drafts_K, drafts_K[:1]]),
                          jnp.where(kept_Kp1, last, fill))
    tokens = jax.lax.dynamic_update_slice(tokens, chunk_Kp1, (n,))
    if eos_id is not None:
      done = done | jnp.any(kept_Kp1 & (chunk_Kp1 == eos_id))
    target_cache = rollback(target_cache, target_steps, a + 1, n + a)
    draft_cache = rollback(draft_cache, draft_steps, a + 1, n + a)
    return n + a + 1, tokens, target_cache, draft_cache, rng, done, drafted + K, accepted + a

  carry = (jnp.int32(T), tokens, *caches, rng, jnp.bool_(False), jnp.int32(0), jnp.int32(0))
  n, tokens, *_, drafted, accepted = jax.lax.while_loop(keep_going, one_round, carry)
  new = jnp.minimum(n, total) - T
  if eos_id is not None:  # the last round may have gone past the end token: cut there
    is_eos = (tokens[T:total] == eos_id) & (jnp.arange(max_new_tokens) < new)
    new = jnp.where(jnp.any(is_eos), jnp.argmax(is_eos) + 1, new)
  tokens = jnp.where(jnp.arange(total) < T + new, tokens[:total], fill)
  return tokens[None], new[None], drafted, accepted
