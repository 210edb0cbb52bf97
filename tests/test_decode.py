"""Cached decoding reproduces the full forward pass; sampling filters do what they say."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.decode import Sampling, generate, generate_uncached, init_cache, prefill, sample_logits
from model import LM, registry
from model.config import POSITIONS, Mamba2Config, MambaConfig, MoEConfig
from tests.conftest import tiny


def setup(cfg, seed=0):
  model = LM(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))
  return model, params['params']


def cached_logits(model, params, tokens_BxL, prompt: int):
  """Logits of positions prompt - 1 .. L - 1 computed as `generate` computes them: the prompt's
  prefill (its last position), then one token a step through the cache. (B, L - prompt + 1, V)."""
  B, L = tokens_BxL.shape

  @jax.jit
  def run(params, tokens_BxL):
    out, cache = prefill(model, params, init_cache(model, B, L), tokens_BxL[:, :prompt])

    def step(cache, t):
      token_Bx1 = jax.lax.dynamic_slice_in_dim(tokens_BxL, t, 1, axis=1)
      out, state = model.apply({'params': params, 'cache': cache}, token_Bx1,
                               jnp.full((B, 1), t), decode=True, mutable=['cache'])
      return state['cache'], out[:, 0]

    _, outs_TxBxV = jax.lax.scan(step, cache, jnp.arange(prompt, L))
    return jnp.concatenate([out, jnp.swapaxes(outs_TxBxV, 0, 1)], axis=1)

  return run(params, tokens_BxL)


def assert_cached_equals_full(cfg, *, batch=2, length=12, prompt=5, atol=2e-5):
  """Decoding through the cache (a prefill of `prompt` tokens, then one at a time) gives the full
  forward pass's logits at every position from the prompt's last on. Returns what it built."""
  model, params = setup(cfg)
  tokens = jax.random.randint(jax.random.key(3), (batch, length), 0, cfg.vocab_size)
  full = jax.jit(model.apply)({'params': params}, tokens)
  np.testing.assert_allclose(cached_logits(model, params, tokens, prompt), full[:, prompt - 1:],
                             atol=atol, rtol=1e-5)
  return model, params, tokens, full


def assert_generation_equals_uncached(model, params, *, prompt_shape=(3, 5), max_new_tokens=10,
                                      sampling=Sampling(0.8, top_k=20)):
  """`generate` (cache) and `generate_uncached` (the whole sequence again each step) draw the
  same tokens from the same key. Returns the tokens and the lengths `generate` gives."""
  prompt = jax.random.randint(jax.random.key(4), prompt_shape, 0, model.config.vocab_size)
  kw = dict(max_new_tokens=max_new_tokens, sampling=sampling)
  cached, lengths = generate(model, params, prompt, jax.random.key(7), **kw)
  uncached, _ = generate_uncached(model, params, prompt, jax.random.key(7), **kw)
  np.testing.assert_array_equal(cached, uncached)
  np.testing.assert_array_equal(cached[:, :prompt_shape[1]], prompt)
  return cached, lengths


@pytest.mark.parametrize('position', POSITIONS)
def test_cached_decoding_equals_full_forward(position):
  assert_cached_equals_full(tiny(position=position, num_kv_heads=2, pattern='attn*2'))


def test_cached_decoding_with_a_sliding_window_equals_full_forward():
  assert_cached_equals_full(tiny(attention_window=4, scan_layers=False), batch=1, prompt=3)


@pytest.mark.parametrize('position', ['rope', 'alibi'])
def test_elementwise_attention_equals_xla_in_training_and_cached_decoding(position):
  """attention_impl='elementwise' (products summed, for a few keys on CPU) computes what
  jax.nn.dot_product_attention does, with grouped-query heads, a window and ALiBi's bias."""
  cfg = tiny(position=position, num_kv_heads=2, attention_window=4, attention_impl='elementwise')
  model, params = setup(cfg)
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
  xla = jax.jit(LM(cfg.replace(attention_impl='xla')).apply)({'params': params}, tokens)
  np.testing.assert_allclose(jax.jit(model.apply)({'params': params}, tokens), xla, atol=2e-5)
  np.testing.assert_allclose(cached_logits(model, params, tokens, prompt=5), xla[:, 4:],
                             atol=2e-5, rtol=1e-5)


# Mamba-2 with its default feed-forward only: which feed-forward follows a mixer is already
# covered by the other mixers, and every case costs seconds of CI time.
LAYER_KINDS = [(mixer, ffn) for mixer in sorted(registry.MIXERS) for ffn in sorted(registry.FFNS)
               if mixer != 'mamba2' or ffn == registry.MIXERS[mixer].default_ffn]


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('mixer, ffn', LAYER_KINDS)
def test_cached_decoding_equals_full_forward_for_every_kind_of_last_layer(mixer, ffn, scan_layers):
  # The kind under test comes last (scanned as a run of two when scan_layers), after a layer of
  # another kind; MoE with a capacity small enough to drop, so slots matter. The prompt of 5
  # crosses the Mamba scan's and Mamba-2's chunk of 4.
  first = 'mamba:moe' if (mixer, ffn) == ('attn', 'mlp') else 'attn:mlp'
  cfg = tiny(pattern=f'{first},{mixer}:{ffn}*2', scan_layers=scan_layers,
             moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5),
             mamba=MambaConfig(scan_chunk=4),
             mamba2=Mamba2Config(head_dim=8, d_state=8, n_groups=2, chunk_size=4))
  model, params, tokens, full = assert_cached_equals_full(cfg, length=11)
  last = jax.jit(lambda p, t: model.apply({'params': p}, t, last_only=True))(params, tokens)
  np.testing.assert_allclose(last, full[:, -1:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('sampling', [Sampling(0.0), Sampling(1.0, top_k=5),
                                      Sampling(0.8, top_p=0.9)])
def test_cached_generation_equals_uncached_token_for_token(sampling):
  model, params = setup(tiny(position='rope'))
  _, lengths = assert_generation_equals_uncached(model, params, max_new_tokens=12,
                                                 sampling=sampling)
  assert np.all(np.asarray(lengths) == 12)


def test_generation_stops_at_the_end_token():
  cfg = tiny()
  model, params = setup(cfg)
  prompt = jnp.asarray([[1, 2, 3]])
  free, _ = generate(model, params, prompt, jax.random.key(0), max_new_tokens=6,
                     sampling=Sampling(0.0))
  eos = int(free[0, 5])  # the third greedy token: declare it the end token
  tokens, n = generate(model, params, prompt, jax.random.key(0), max_new_tokens=6,
                       sampling=Sampling(0.0), eos_id=eos)
  first = int(np.argmax(np.asarray(free[0, 3:]) == eos))  # its first appearance
  assert n.tolist() == [first + 1]
  np.testing.assert_array_equal(tokens[0, :3 + first + 1], free[0, :3 + first + 1])
  assert np.all(np.asarray(tokens[0, 3 + first:]) == eos)


@pytest.mark.parametrize('pattern', ['attn*2', 'mamba,attn:moe'])
def test_a_batch_of_prompts_of_different_lengths_generates_what_each_does_alone(pattern):
  cfg = tiny(pattern=pattern, moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5),
             mamba=MambaConfig(scan_chunk=4))
  model, params = setup(cfg)
  lengths = [3, 7, 5]
  prompts = np.asarray(jax.random.randint(jax.random.key(4), (3, 7), 0, cfg.vocab_size))
  kw = dict(max_new_tokens=6, sampling=Sampling(0.0))
  batch, new = generate(model, params, prompts, jax.random.key(0), prompt_lengths_B=lengths,
                        prefix=3, **kw)
  assert np.all(np.asarray(new) == 6)
  for row, length in enumerate(lengths):
    alone, _ = generate(model, params, prompts[row:row + 1, :length], jax.random.key(0), **kw)
    np.testing.assert_array_equal(np.asarray(batch)[row, :length + 6], np.asarray(alone)[0])


def test_sampling_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(0)
  greedy = sample_logits(logits, keys, Sampling(0.0))
  assert np.all(np.asarray(greedy) == 0)
  np.testing.assert_array_equal(sample_logits(logits, keys, Sampling(1.0, top_k=1)), greedy)
  np.testing.assert_array_equal(sample_logits(logits, keys, Sampling(1.0, top_p=0.3)), greedy)
  top2 = np.asarray(sample_logits(logits, keys, Sampling(1.0, top_k=2)))
  assert set(top2) == {0, 1} and abs(np.mean(top2 == 0) - 0.5 / 0.8) < 0.03
  nucleus = np.asarray(sample_logits(logits, keys, Sampling(1.0, top_p=0.85)))
  assert set(nucleus) == {0, 1, 2}  # 0.5 + 0.3 < 0.85 <= 0.5 + 0.3 + 0.15
  free = np.asarray(sample_logits(logits, keys, Sampling(1.0)))
  np.testing.assert_allclose(np.bincount(free, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05],
                             atol=0.025)


@pytest.mark.parametrize('kw', [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0)])
def test_bad_sampling_settings(kw):
  with pytest.raises(ValueError):
    Sampling(**kw)
