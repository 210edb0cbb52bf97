"""The block pattern: parsing, the registry, and scanned stacks computing what unscanned ones do."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import LM, blocks, registry
from model.config import ConfigError
from tests.conftest import tiny


@pytest.mark.parametrize('pattern, expected', [
    ('attn*3', [('attn', 'mlp')] * 3),
    ('attn:mlp,attn:none', [('attn', 'mlp'), ('attn', 'none')]),
    (' attn , attn:none * 2 ', [('attn', 'mlp'), ('attn', 'none'), ('attn', 'none')]),
    ('(attn,attn:none)*2,attn', [('attn', 'mlp'), ('attn', 'none')] * 2 + [('attn', 'mlp')]),
])
def test_parse_pattern(pattern, expected):
  assert list(registry.parse_pattern(pattern)) == expected


@pytest.mark.parametrize('pattern, message', [
    ('attn*2,transformer', "unknown mixer 'transformer'"),
    ('attn:glu', "unknown feed-forward 'glu'"),
    ('(attn*2', 'unbalanced parentheses'),
    ('attn*0', 'repeat counts must be >= 1'),
    ('', 'pattern is empty'),
    ('attn;attn', 'cannot parse'),
])
def test_bad_patterns_name_the_problem(pattern, message):
  with pytest.raises(ConfigError, match=message):
    tiny(pattern=pattern)


def test_runs_group_consecutive_identical_layers():
  layers = registry.parse_pattern('attn*3,attn:none,attn*2')
  assert blocks.runs(layers) == [(0, ('attn', 'mlp'), 3), (3, ('attn', 'none'), 1),
                                 (4, ('attn', 'mlp'), 2)]


def test_a_registered_mixer_plugs_in_without_touching_the_stack():
  @registry.register_mixer('_shift', default_ffn='none')
  class Shift(nn.Module):  # a toy token-shift mixer: y_t = W x_{t-1}
    config: object
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions):
      shifted = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
      return nn.Dense(x.shape[-1], use_bias=False)(shifted)

  try:
    cfg = tiny(pattern='_shift,attn')
    assert cfg.layers == (('_shift', 'none'), ('attn', 'mlp'))
    model = LM(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
    assert set(params['blocks']) == {'layer_0', 'layer_1'}
    assert 'ffn' not in params['blocks']['layer_0']
  finally:
    del registry.MIXERS['_shift']


def unstack(scanned_params, cfg):
  """Scanned-layout parameters rearranged into the unscanned layout (layer_i per layer)."""
  out = {k: v for k, v in scanned_params.items() if k != 'blocks'}
  out['blocks'] = {}
  for first, _, count in blocks.runs(cfg.layers):
    run = scanned_params['blocks'][blocks.run_name(first, count)]
    for i in range(count):
      out['blocks'][blocks.run_name(first + i, 1)] = (
          jax.tree.map(lambda x: x[i], run) if count > 1 else run)
  return out


def square_loss(cfg, params, tokens):
  return jnp.mean(LM(cfg).apply({'params': params}, tokens) ** 2)


def assert_scanned_equals_plain(scanned_cfg, scanned, plain_cfg, plain, tokens):
  """The scanned stack's loss and gradients (unstacked) equal the unscanned stack's."""
  value_s, grad_s = jax.jit(jax.value_and_grad(
      lambda p: square_loss(scanned_cfg, p, tokens)))(scanned)
  value_p, grad_p = jax.jit(jax.value_and_grad(lambda p: square_loss(plain_cfg, p, tokens)))(plain)
  np.testing.assert_allclose(value_s, value_p, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(unstack(grad_s, scanned_cfg)), jax.tree.leaves(grad_p)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('pattern, remat', [('attn*3', 'none'),
                                            ('attn*2,attn:none,attn*2', 'full'),
                                            ('attn*2', 'dots')])
def test_scanned_stack_equals_unscanned_stack(pattern, remat):
  scanned_cfg = tiny(pattern=pattern, scan_layers=True, remat=remat)
  plain_cfg = tiny(pattern=pattern, scan_layers=False)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 61)
  scanned = nn.unbox(jax.jit(LM(scanned_cfg).init)(jax.random.key(0), tokens))['params']
  plain = unstack(scanned, scanned_cfg)
  assert jax.tree.structure(plain) == jax.tree.structure(
      nn.unbox(jax.eval_shape(LM(plain_cfg).init, jax.random.key(0), tokens)['params']))

  assert_scanned_equals_plain(scanned_cfg, scanned, plain_cfg, plain, tokens)
