"""The model core: causality, attention against a reference, positional schemes, dtypes, axes."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import LM, positions
from model.attention import Attention
from model.config import POSITIONS
from tests.conftest import tiny


def init(cfg, length=16, seed=0):
  """(model, params); compiled, since op-by-op dispatch of a whole model is slower to run."""
  model = LM(cfg)
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((2, length), jnp.int32))
  return model, nn.unbox(variables)['params']


def forward(model, params, *token_batches):
  apply = jax.jit(model.apply)
  return [apply({'params': params}, tokens) for tokens in token_batches]


def random_tokens(cfg, shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


@pytest.mark.parametrize('position', POSITIONS)
def test_causal_for_every_positional_scheme(position):
  cfg = tiny(position=position)
  model, params = init(cfg)
  tokens = random_tokens(cfg, (2, 16))
  t = 9
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
  a, b = forward(model, params, tokens, changed)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])       # nothing before t moves
  assert np.abs(np.asarray(a[:, t:] - b[:, t:])).max() > 1e-4   # t itself (and later) does


def reference_attention(x, p, num_heads, num_kv_heads):
  """Plain multi-head attention in numpy float64, kv heads repeated for each query group."""
  x = np.asarray(x, np.float64)
  q = np.einsum('bld,dhk->blhk', x, p['query']['kernel'])
  k = np.einsum('bld,dhk->blhk', x, p['key']['kernel'])
  v = np.einsum('bld,dhk->blhk', x, p['value']['kernel'])
  group = num_heads // num_kv_heads
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scores = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1])
  L = x.shape[1]
  scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum('bhqs,bshk->bqhk', probs, v)
  return np.einsum('bqhk,hkd->bqd', out, p['out']['kernel'])


@pytest.mark.parametrize('impl', ['xla', 'elementwise'])
@pytest.mark.parametrize('num_kv_heads', [4, 2, 1])  # MHA, GQA, MQA
def test_attention_equals_reference_multi_head_attention(num_kv_heads, impl):
  from model.attention import Attention
  cfg = tiny(num_kv_heads=num_kv_heads, position='none', attention_impl=impl)
  attn = Attention(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 12, cfg.d_model))
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  params = nn.unbox(attn.init(jax.random.key(1), x, pos))['params']
  expected = reference_attention(x, jax.tree.map(np.asarray, params), cfg.num_heads,
                                 num_kv_heads)
  np.testing.assert_allclose(attn.apply({'params': params}, x, pos), expected, atol=1e-5)


def test_gqa_with_repeated_kv_weights_equals_mha():
  """A GQA layer computes what MHA computes when MHA's kv weights repeat GQA's per group."""
  from model.attention import Attention
  gqa_cfg, mha_cfg = tiny(num_kv_heads=2), tiny(num_kv_heads=4)
  x = jax.random.normal(jax.random.key(0), (2, 10, 32))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  gqa = nn.unbox(Attention(gqa_cfg).init(jax.random.key(1), x, pos))['params']
  mha = dict(gqa)
  for name in ('key', 'value'):
    mha[name] = {'kernel': jnp.repeat(gqa[name]['kernel'], 2, axis=1)}
  np.testing.assert_allclose(Attention(gqa_cfg).apply({'params': gqa}, x, pos),
                             Attention(mha_cfg).apply({'params': mha}, x, pos), atol=1e-6)


def test_rope_scores_depend_only_on_offset():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

  def score(m, n):
    qm = positions.rope(q, jnp.full((1, 1), m), 10000.0)
    kn = positions.rope(k, jnp.full((1, 1), n), 10000.0)
    return float(jnp.sum(qm * kn))

  for m, n in [(5, 2), (7, 7), (3, 11)]:
    for shift in (1, 10, 100):
      np.testing.assert_allclose(score(m, n), score(m + shift, n + shift), rtol=1e-4, atol=1e-5)
  assert abs(score(5, 2) - score(5, 3)) > 1e-3  # and they do depend on the offset


def test_rope_base_is_configurable():
  x = jax.random.normal(jax.random.key(0), (1, 4, 1, 8))
  pos = jnp.arange(4)[None]
  assert not np.allclose(positions.rope(x, pos, 10000.0), positions.rope(x, pos, 500000.0))


def test_alibi_slopes_follow_the_paper():
  # Power of two: 2^(-8/n), its square, ... (Press et al. 2022, section 3).
  np.testing.assert_allclose(positions.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
  np.testing.assert_allclose(positions.alibi_slopes(4), [2.0 ** -(2 * (i + 1)) for i in range(4)])
  # Not a power of two (the paper's reference code): 8 slopes for 8 heads, then the odd-indexed
  # slopes of 16 heads (2^-0.5, 2^-1.5, ...) for the remaining 4.
  expected12 = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)]
  np.testing.assert_allclose(positions.alibi_slopes(12), expected12, rtol=1e-6)
  expected6 = [2.0 ** -(2 * (i + 1)) for i in range(4)] + [2.0 ** -1, 2.0 ** -3]
  np.testing.assert_allclose(positions.alibi_slopes(6), expected6, rtol=1e-6)


def test_alibi_bias_is_minus_slope_times_distance():
  pos = jnp.arange(5)[None]
  bias = positions.alibi_bias(pos, pos, 4)[0]  # (H, T, S)
  slopes = positions.alibi_slopes(4)
  for h in range(4):
    for i in range(5):
      for j in range(i + 1):
        np.testing.assert_allclose(bias[h, i, j], -slopes[h] * (i - j), rtol=1e-6)


def test_alibi_bias_stays_float32_under_bfloat16_compute():
  # One head (slope 2^-8), zero queries and keys: the scores are ALiBi's bias alone, and the
  # output is the probability of the one key whose value is 1. Its distance, 3000, makes the
  # bias -11.71875, half-way between two bfloat16 values (1/16 apart there): rounded, the
  # probability would be off by e^(1/32) - 1 = 3%; bfloat16 probabilities themselves err ~0.4%.
  cfg = tiny(d_model=8, num_heads=1, position='alibi', dtype='bfloat16')
  q, d = 3000, 3000
  x_LxD = np.zeros((q + 1, 8), np.float32)
  x_LxD[q - d, 0] = 1.0
  attention = Attention(cfg)
  positions_1xL = jnp.arange(q + 1)[None]
  params = nn.unbox(attention.init(jax.random.key(0), jnp.asarray(x_LxD)[None],
                                   positions_1xL))['params']
  params = jax.tree.map(jnp.zeros_like, params)
  params['value']['kernel'] = params['value']['kernel'].at[0].set(1.0)     # v_t = x_t[0]
  params['out']['kernel'] = params['out']['kernel'].at[0, 0, 0].set(1.0)  # y_t[0] = o_t[0]
  y = jax.jit(attention.apply)({'params': params}, jnp.asarray(x_LxD)[None], positions_1xL)
  bias = -(2.0 ** -8) * (q - np.arange(q + 1))
  p = np.exp(bias) / np.exp(bias).sum()
  np.testing.assert_allclose(float(y[0, q, 0]), p[q - d], rtol=0.01)


def test_sinusoidal_table_follows_the_paper():
  d = 16
  pe = np.asarray(positions.sinusoidal(jnp.arange(50)[None], d))[0]
  for pos in (0, 1, 7, 49):
    for i in range(d // 2):
      angle = pos / 10000 ** (2 * i / d)
      np.testing.assert_allclose(pe[pos, 2 * i], np.sin(angle), atol=1e-5)
      np.testing.assert_allclose(pe[pos, 2 * i + 1], np.cos(angle), atol=1e-5)


def test_logits_float32_with_bfloat16_compute_and_float32_params():
  cfg = tiny(dtype='bfloat16')
  model, params = init(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  [logits] = forward(model, params, random_tokens(cfg, (2, 16)))
  assert logits.dtype == jnp.float32
  [ref] = forward(LM(tiny()), params, random_tokens(cfg, (2, 16)))
  # bfloat16 keeps 8 bits of mantissa: each rounding errs by up to 2^-9 of the value. The logits
  # pass through a few of them; allow four at the logits' largest magnitude, and require some
  # error, so that a model silently computing in float32 fails.
  error = np.abs(np.asarray(logits) - np.asarray(ref)).max()
  assert 0 < error <= 4 * 2.0 ** -9 * np.abs(np.asarray(ref)).max()


def test_tied_and_untied_heads():
  tied_model, tied = init(tiny(tie_embeddings=True))
  untied_model, untied = init(tiny(tie_embeddings=False))
  assert 'lm_head' not in tied and untied['lm_head'].shape == (61, 32)
  untied['lm_head'] = untied['token_embedding']
  tokens = random_tokens(tiny(), (2, 16))
  np.testing.assert_allclose(forward(untied_model, untied, tokens)[0],
                             forward(tied_model, untied, tokens)[0], atol=1e-6)


@pytest.mark.parametrize('overrides', [dict(), dict(qk_norm=True, activation='gelu',
                                                    norm='layernorm', use_bias=True)])
def test_every_parameter_carries_logical_axis_names(overrides):
  cfg = tiny(**overrides, position='learned', tie_embeddings=False)
  boxed = jax.eval_shape(LM(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), leaf
    assert len(leaf.names) == leaf.value.ndim and all(leaf.names)
  names = {n for leaf in leaves for n in leaf.names}
  assert {'vocab', 'embed', 'heads', 'kv', 'mlp', 'layers', 'position'} <= names


@pytest.mark.parametrize('activation', ['gelu', 'relu', 'swiglu'])
def test_feed_forward_matches_formula(activation):
  from model.ffn import MLP
  cfg = tiny(activation=activation)
  x = jax.random.normal(jax.random.key(0), (2, 3, 32))
  p = nn.unbox(MLP(cfg).init(jax.random.key(1), x))['params']
  k = {name: np.asarray(v['kernel'], np.float64) for name, v in p.items()}
  xn = np.asarray(x, np.float64)
  if activation == 'swiglu':
    gate = xn @ k['wi_gate']
    h = gate / (1 + np.exp(-gate)) * (xn @ k['wi_up'])
  elif activation == 'relu':
    h = np.maximum(xn @ k['wi'], 0)
  else:
    h = np.asarray(jax.nn.gelu(jnp.asarray(xn @ k['wi'])))
  np.testing.assert_allclose(MLP(cfg).apply({'params': p}, x), h @ k['wo'], atol=1e-5)


def test_projection_gradients_are_plain_matmuls_without_transposed_copies():
  """A (B, L, D) projection runs as one (B*L, D) matmul on CPU (layers.projection_dot): its weight
  gradients equal the numpy formulas, and XLA's CPU program computes them without copying
  activations transposed (what a (B, L)-contracting gradient costs, BENCHMARKS.md); a TPU
  program keeps the (B, L, D) form."""
  from model.ffn import MLP
  cfg = tiny(activation='relu', use_bias=True)
  x = jax.random.normal(jax.random.key(0), (16, 8, 32))
  g = jax.random.normal(jax.random.key(2), (16, 8, 32))
  mlp = MLP(cfg)
  p = nn.unbox(mlp.init(jax.random.key(1), x))['params']
  grad = jax.jit(jax.grad(lambda p: jnp.sum(mlp.apply({'params': p}, x) * g)))
  got = grad(p)
  x2, g2 = np.asarray(x, np.float64).reshape(-1, 32), np.asarray(g, np.float64).reshape(-1, 32)
  wi, wo = (np.asarray(p[n]['kernel'], np.float64) for n in ('wi', 'wo'))
  pre = x2 @ wi + np.asarray(p['wi']['bias'])
  dh = (g2 @ wo.T) * (pre > 0)
  expected = {'wi': {'kernel': x2.T @ dh, 'bias': dh.sum(0)},
              'wo': {'kernel': np.maximum(pre, 0).T @ g2, 'bias': g2.sum(0)}}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, expected)
  hlo = grad.lower(p).compile().as_text()
  copies = re.findall(r'%(?:copy|transpose)[\w.\-]* = f32\[([\d,]+)\]', hlo)
  assert not [dims for dims in copies if '128' in dims.split(',') or '16,8' in dims], copies
  # The 2-D form cost a TPU memory and time (BENCHMARKS.md): other platforms keep (B, L, D).
  def dot_operand_shapes(platform):
    text = grad.trace(p).lower(lowering_platforms=(platform,)).as_text()
    signatures = re.findall(r'stablehlo\.dot_general .* : \((.*)\) ->', text)
    return {shape for sig in signatures for shape in re.findall(r'tensor<([\dx]+)xf32>', sig)}
  cpu_shapes, tpu_shapes = dot_operand_shapes('cpu'), dot_operand_shapes('tpu')
  assert cpu_shapes and all(shape.count('x') == 1 for shape in cpu_shapes), cpu_shapes
  assert '16x8x32' in tpu_shapes, tpu_shapes


def test_attention_window_limits_what_a_token_sees():
  cfg = tiny(attention_window=4, position='rope')
  model, params = init(cfg)
  tokens = random_tokens(cfg, (1, 16))
  changed = tokens.at[:, 2].set((tokens[:, 2] + 1) % cfg.vocab_size)
  a, b = forward(model, params, tokens, changed)
  # Two layers of window 4 reach back 6 tokens: position 2 influences 2..8 and nothing after.
  assert np.abs(np.asarray(a[:, 2:9] - b[:, 2:9])).max() > 1e-4
  np.testing.assert_allclose(a[:, 9:], b[:, 9:], atol=1e-6)
