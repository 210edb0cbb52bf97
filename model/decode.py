"""Autoregressive generation: prefill the prompt into the per-layer caches, then one-token steps.

Every layer keeps its own decoding state in the model's 'cache' collection: keys and values for
attention, (conv state, SSM state) for Mamba. `generate` compiles prefill plus a `lax.while_loop`
of decode steps into one program; `generate_uncached` recomputes the whole sequence for every new
token, the reference the cache must reproduce token for token (and the baseline it beats).
`speculative_generate` (model/speculative.py, which builds on this module) samples the same
distribution with a small draft model proposing tokens for the target to verify.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from model import LM
from model.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ConfigError(f'temperature must be >= 0 (0 is greedy), got {self.temperature}')
    if self.top_k < 0:
      raise ConfigError(f'top_k must be >= 0 (0 keeps every token), got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      raise ConfigError(f'top_p must be in (0, 1] (1 keeps every token), got {self.top_p}')


def sample_logits(logits_BxV, rng, sampling: Sampling):
  """One token per row: argmax at temperature 0, else a draw from the tempered distribution
  restricted to the top_k tokens and to the smallest set whose probability reaches top_p."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits_BxV, sampling),
                                axis=-1).astype(jnp.int32)


def filter_logits(logits_BxV, sampling: Sampling):
  """The logits that temperature > 0 samples from (float32): divided by the temperature, -inf
  outside the top_k tokens and outside the smallest set whose probability reaches top_p."""
  logits = logits_BxV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs     # mass of the strictly more likely tokens
    kept = jnp.where(before < sampling.top_p, sorted_desc, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def init_cache(model: LM, batch: int, length: int):
  """Zeroed decoding state for `batch` sequences of up to `length` tokens."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, length),
                                                                          jnp.int32), decode=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])


def _positions(start, batch: int, length: int):
  return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))


def prefill(model: LM, params, cache, prompt_BxT):
  """Feeds the prompt through the caches at positions 0..T-1: (logits of its last position
  (B, 1, V), the filled cache). Every layer sees every prompt position (`last_only` trims only
  what no cache depends on), so the cache holds what the full forward pass computes."""
  B, T = prompt_BxT.shape
  logits, state = model.apply({'params': params, 'cache': cache}, prompt_BxT,
                              _positions(0, B, T), decode=True, last_only=True,
                              mutable=['cache'])
  return logits, state['cache']


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'sampling', 'eos_id',
                                             'prefix'))
def generate(model: LM, params, prompt_BxT, rng, *, max_new_tokens: int,
             sampling: Sampling = Sampling(), eos_id: int | None = None,
             prompt_lengths_B=None, prefix: int | None = None):
  """(tokens (B, T + max_new_tokens), new tokens per row (B,)). Row b's prompt is its first
  prompt_lengths_B[b] tokens (all T when not given; the rest is padding) and its new tokens follow
  it. After a row's end token (eos_id) the row repeats it; generation stops once every row has
  ended or made max_new_tokens.

  Prompts of different lengths are exact for every mixer: the first `prefix` positions (static;
  at most the shortest prompt, all of T when the prompts are whole) go through the caches in one
  call, then the rest one position at a time, each row reading its prompt's token while it has
  one and sampling after, so that every row computes what it would alone."""
  B, T = prompt_BxT.shape
  lengths_B = (jnp.full((B,), T, jnp.int32) if prompt_lengths_B is None
               else jnp.asarray(prompt_lengths_B, jnp.int32))
  prefix = T if prefix is None else prefix
  total = T + max_new_tokens
  logits, cache = prefill(model, params, init_cache(model, B, total), prompt_BxT[:, :prefix])
  fill = 0 if eos_id is None else eos_id
  tokens = jnp.full((B, total), fill, jnp.int32).at[:, :T].set(prompt_BxT)

  def keep_going(carry):
    position, _, _, _, _, done, new_B = carry
    return (position < total) & ~jnp.all(done | (new_B >= max_new_tokens))

  def decode_step(carry):
    position, tokens, cache, logits, rng, done, new_B = carry
    rng, key = jax.random.split(rng)
    sampled_B = sample_logits(logits[:, -1], key, sampling)
    in_prompt_B = position < lengths_B
    finished_B = done | (new_B >= max_new_tokens)
    token_B = jnp.where(in_prompt_B, tokens[:, position],
                        jnp.where(finished_B, fill, sampled_B))
    if eos_id is not None:
      done = done | (~in_prompt_B & (token_B == eos_id))
    new_B = new_B + (~in_prompt_B & ~finished_B)
    tokens = jax.lax.dynamic_update_slice(tokens, token_B[:, None], (0, position))
    logits, state = model.apply({'params': params, 'cache': cache}, token_B[:, None],
                                _positions(position, B, 1), decode=True, mutable=['cache'])
    return position + 1, tokens, state['cache'], logits, rng, done, new_B

  carry = (jnp.int32(prefix), tokens, cache, logits, rng, jnp.zeros((B,), bool),
           jnp.zeros((B,), jnp.int32))
  _, tokens, *_, new_B = jax.lax.while_loop(keep_going, decode_step, carry)
  return tokens, new_B


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'sampling', 'eos_id'))
def generate_uncached(model: LM, params, prompt_BxT, rng, *, max_new_tokens: int,
                      sampling: Sampling = Sampling(), eos_id: int | None = None):
  """The same as `generate`, recomputing the full forward pass over the whole buffer for every
  token (causality makes the not-yet-written tail irrelevant)."""
  B, T = prompt_BxT.shape
  fill = 0 if eos_id is None else eos_id
  tokens = jnp.full((B, T + max_new_tokens), fill, jnp.int32).at[:, :T].set(prompt_BxT)

  def keep_going(carry):
    i, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def step(carry):
    i, tokens, rng, done = carry
    rng, key = jax.random.split(rng)
    logits = model.apply({'params': params}, tokens)
    last = jax.lax.dynamic_index_in_dim(logits, T + i - 1, axis=1, keepdims=False)
    token_B = sample_logits(last, key, sampling)
    if eos_id is not None:
      token_B = jnp.where(done, eos_id, token_B)
      done = done | (token_B == eos_id)
    return i + 1, tokens.at[:, T + i].set(token_B), rng, done

  i, tokens, _, done = jax.lax.while_loop(keep_going, step,
                                          (jnp.int32(0), tokens, rng, jnp.zeros((B,), bool)))
  return tokens, jnp.full((B,), i, jnp.int32)

