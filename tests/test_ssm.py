"""The selective scan and the Mamba mixer: the parallel scan against the sequential one and the
recurrence written out in NumPy, the paper's initialisation, causality, cached decoding of Mamba
and hybrid stacks, and training end to end."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from model import LM, count_params, training_flops_per_token
from model.config import ConfigError, MambaConfig
from model.ssm import selective_scan
from train.loop import train_and_evaluate
from tests.conftest import run_config, tiny
from tests.test_blocks import assert_scanned_equals_plain, square_loss, unstack
from tests.test_counting import compiled_flops_per_token
from tests.test_decode import (assert_cached_equals_full, assert_generation_equals_uncached,
                               setup)


def scan_inputs(seed=0, b=2, L=37, d=6, n=4):
  k = jax.random.split(jax.random.key(seed), 8)
  normal = lambda key, shape: jax.random.normal(key, shape, jnp.float32)
  return dict(u=normal(k[0], (b, L, d)), delta=normal(k[1], (b, L, d)),
              A=-jnp.exp(normal(k[2], (d, n))), B=normal(k[3], (b, L, n)),
              C=normal(k[4], (b, L, n)), D=normal(k[5], (d,)), z=normal(k[6], (b, L, d)),
              delta_bias=normal(k[7], (d,)))


def recurrence(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
  """The issue's equations, one time step at a time, in float64."""
  u, delta, A, B, C = (np.asarray(a, np.float64) for a in (u, delta, A, B, C))
  if delta_bias is not None:
    delta = delta + np.asarray(delta_bias)
  if delta_softplus:
    delta = np.log1p(np.exp(delta))
  x = np.zeros((u.shape[0], u.shape[2], A.shape[1]))
  ys = []
  for t in range(u.shape[1]):
    x = (np.exp(delta[:, t, :, None] * A) * x
         + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :])
    ys.append(np.einsum('bdn,bn->bd', x, C[:, t]))
  y = np.stack(ys, axis=1)
  if D is not None:
    y = y + u * np.asarray(D)
  if z is not None:
    z = np.asarray(z, np.float64)
    y = y * z / (1 + np.exp(-z))
  return y, x


OPTIONAL = {'bare': (), 'with z, D, delta_bias and softplus': ('D', 'z', 'delta_bias')}


@pytest.mark.parametrize('optional', OPTIONAL)
def test_parallel_scan_equals_sequential_scan_and_the_recurrence(optional):
  inputs = scan_inputs()
  args = {k: inputs[k] for k in ('u', 'delta', 'A', 'B', 'C') + OPTIONAL[optional]}
  softplus = 'delta_bias' in args
  if not softplus:  # without softplus Δ must be positive for a stable recurrence
    args['delta'] = jnp.abs(args['delta'])
  y_ref, x_ref = recurrence(**args, delta_softplus=softplus)
  ky, kx = jax.random.split(jax.random.key(1))
  gy, gx = jax.random.normal(ky, y_ref.shape), jax.random.normal(kx, x_ref.shape)

  def gradients_and_outputs(impl):  # one compile gives y, the last state and every gradient
    def loss(a):
      y, x = selective_scan(**a, delta_softplus=softplus, return_last_state=True, impl=impl,
                            chunk=8)  # 5 chunks over 37 steps, the last 3 steps padding
      return jnp.sum(y * gy) + jnp.sum(x * gx), (y, x)
    return jax.jit(jax.grad(loss, has_aux=True))(args)

  g_par, (y_par, x_par) = gradients_and_outputs('parallel')
  g_seq, (y_seq, x_seq) = gradients_and_outputs('sequential')
  np.testing.assert_allclose(y_par, y_seq, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x_par, x_seq, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y_par, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x_par, x_ref, rtol=1e-5, atol=1e-5)
  for name in args:
    np.testing.assert_allclose(g_par[name], g_seq[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_a_scan_continues_from_its_last_state_and_computes_in_float32():
  a = scan_inputs(1)
  kw = dict(D=a['D'], delta_bias=a['delta_bias'], delta_softplus=True)
  scan = jax.jit(lambda u, delta, B, C, z, x0: selective_scan(
      u, delta, a['A'], B, C, z=z, **kw, return_last_state=True, chunk=8, initial_state=x0))
  cut = lambda lo, hi: [a[k][:, lo:hi] for k in ('u', 'delta', 'B', 'C', 'z')]
  y_all, x_all = scan(*cut(0, 37), None)
  y_head, x_head = scan(*cut(0, 20), None)
  y_tail, x_tail = scan(*cut(20, 37), x_head)  # as a prefill followed by decoding continues
  np.testing.assert_allclose(jnp.concatenate([y_head, y_tail], 1), y_all, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x_tail, x_all, rtol=1e-5, atol=1e-5)

  # bfloat16 inputs: the result comes back in bfloat16, but the scan ran in float32 (it equals
  # the float32 scan of the same rounded inputs up to the output's rounding).
  bf16 = {k: v.astype(jnp.bfloat16) for k, v in a.items()}
  scan = jax.jit(lambda a: selective_scan(**a, delta_softplus=True, chunk=8))
  y_bf16 = scan(bf16)
  y_f32 = scan({k: v.astype(jnp.float32) for k, v in bf16.items()})
  assert y_bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(y_bf16.astype(jnp.float32), y_f32, rtol=2 ** -8, atol=1e-6)


def test_bad_scan_inputs_name_the_argument():
  a = scan_inputs()
  with pytest.raises(ValueError, match=r'B has shape \(2, 36, 4\), expected \(2, 37, 4\)'):
    selective_scan(a['u'], a['delta'], a['A'], a['B'][:, 1:], a['C'])
  with pytest.raises(ValueError, match=r"impl='fast' is not known"):
    selective_scan(a['u'], a['delta'], a['A'], a['B'], a['C'], impl='fast')
  with pytest.raises(ConfigError, match='model.mamba.dt_rank must be positive'):
    tiny(pattern='mamba', mamba=MambaConfig(dt_rank=0))


def hand_count(D, Din, N, R, W):
  """Parameters of one mamba layer (no biases in projections, conv bias on) and its norm."""
  return (2 * D * Din            # in_x, in_z
          + W * Din + Din        # depthwise conv and its bias
          + Din * (R + 2 * N)    # x_to_dt, x_to_B, x_to_C
          + R * Din + Din        # dt_proj and Δ's bias
          + Din * N + Din        # A_log, D
          + Din * D              # out
          + D)                   # the block's norm


def test_initialisation_follows_the_paper_and_counts_match_the_tree():
  cfg = tiny(pattern='mamba', d_model=256, mamba=MambaConfig(d_state=8))
  Din, N, R = 512, 8, 16
  model, params = setup(cfg)
  mixer = params['blocks']['layer_0']['mixer']
  A = -np.exp(np.asarray(mixer['A_log']))
  np.testing.assert_allclose(A, -np.broadcast_to(np.arange(1, N + 1), (Din, N)), rtol=1e-6)
  np.testing.assert_array_equal(mixer['D'], np.ones(Din))
  dt = np.asarray(jax.nn.softplus(mixer['dt_proj']['bias']))  # Δ when x's projection is small
  m = cfg.mamba
  assert m.dt_min * 0.999 <= dt.min() and dt.max() <= m.dt_max * 1.001
  log_range = np.log(m.dt_max) - np.log(m.dt_min)
  assert scipy.stats.kstest(np.log(dt), 'uniform', (np.log(m.dt_min), log_range)).pvalue > 0.01

  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  names = {'/'.join(str(k.key) for k in path): leaf.names for path, leaf in
           jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))}
  assert names['blocks/layer_0/mixer/A_log'] == ('ssm_inner', 'ssm_state')
  assert names['blocks/layer_0/mixer/conv/kernel'] == ('conv', 'ssm_inner')
  assert names['blocks/layer_0/mixer/dt_proj/kernel'] == ('ssm_rank', 'ssm_inner')

  counts = count_params(cfg)
  non_embedding = hand_count(256, Din, N, R, 4) + 256  # + the final norm
  assert counts.non_embedding == non_embedding
  assert counts.total == sum(np.size(x) for x in jax.tree.leaves(params))
  # 6 x (N + D x V), plus the scan's elementwise work: per state element (512 x 8 of them) 7
  # forward FLOPs (x 3 for training), of which A_log's 6 x params already counts 6: 15 each,
  # 61,440 in all, whatever the length.
  expected = 6 * (non_embedding + 256 * 61) + 61_440
  assert training_flops_per_token(cfg, 64) == training_flops_per_token(cfg, 128) == expected

  floored = tiny(pattern='mamba', mamba=MambaConfig(dt_min=1e-5, dt_max=1e-3, dt_init_floor=1e-4))
  dt = jax.nn.softplus(setup(floored)[1]['blocks']['layer_0']['mixer']['dt_proj']['bias'])
  assert np.all(np.asarray(dt) >= 1e-4 * 0.999) and np.any(np.asarray(dt) < 1.001e-4)


def test_mamba_flops_against_the_compiled_program():
  """`training_flops_per_token` of a Mamba layer against the matmuls of its compiled forward and
  backward pass (train/hlo.py): they do all of it but what no matmul does, 6 x the parameters
  of the elementwise work and the scan's own term, both written out here."""
  cfg = tiny(pattern='mamba')  # D 32, Din 64, N 16
  # Parameters outside matmuls: the conv (shifted products) 4 x 64 and its bias 64, Δ's bias 64,
  # A_log 64 x 16, D 64, the block's and the final norm 2 x 32: 1,536.
  # The scan (`mamba_flops_per_token`): 15 per state element and token, 15 x 64 x 16 = 15,360.
  assert compiled_flops_per_token(cfg, 16) == (training_flops_per_token(cfg, 16) - 6 * 1_536
                                               - 15_360)


def test_mamba_lm_is_causal_and_both_scans_give_its_logits():
  cfg = tiny(pattern='mamba*2', mamba=MambaConfig(scan_chunk=4))
  model, params = setup(cfg)
  tokens = jax.random.randint(jax.random.key(2), (2, 13), 0, cfg.vocab_size)
  changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % cfg.vocab_size)
  apply = jax.jit(model.apply)
  logits, logits_changed = apply({'params': params}, tokens), apply({'params': params}, changed)
  np.testing.assert_array_equal(logits[:, :6], logits_changed[:, :6])
  # Later positions change too, also those beyond the conv's reach (10 on), through the state
  # alone: weakly at initialisation, but well above float32 noise.
  assert np.all(np.abs(logits[:, 6:] - logits_changed[:, 6:]).max(-1) > 1e-6)
  sequential = LM(tiny(pattern='mamba*2', mamba=MambaConfig(scan_impl='sequential')))
  np.testing.assert_allclose(jax.jit(sequential.apply)({'params': params}, tokens), logits,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('pattern, scan_layers', [('mamba*2', True), ('mamba,attn', False)])
def test_cached_decoding_equals_full_forward(pattern, scan_layers):
  # Chunks of 4: the prefill of 5 tokens crosses a chunk boundary and is padded.
  cfg = tiny(pattern=pattern, scan_layers=scan_layers, mamba=MambaConfig(scan_chunk=4))
  assert_cached_equals_full(cfg, length=8)


def test_cached_generation_of_a_hybrid_equals_uncached_token_for_token():
  # MoE-Mamba beside attention: every kind of decoding state (SSM, KV, expert slots) at once.
  assert_generation_equals_uncached(*setup(tiny(pattern='mamba:moe,attn')))


def test_scanned_rematerialised_and_bfloat16_stacks_compute_the_same_function():
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 61)
  scanned_cfg = tiny(pattern='mamba*2', scan_layers=True, remat='full')
  plain_cfg = tiny(pattern='mamba*2', scan_layers=False)
  scanned = setup(scanned_cfg)[1]
  plain = unstack(scanned, scanned_cfg)

  assert_scanned_equals_plain(scanned_cfg, scanned, plain_cfg, plain, tokens)
  value = jax.jit(lambda p: square_loss(plain_cfg, p, tokens))(plain)
  value_bf16 = jax.jit(lambda p: square_loss(plain_cfg.replace(dtype='bfloat16'), p, tokens))(plain)
  np.testing.assert_allclose(value_bf16, value, rtol=0.02)


@pytest.mark.slow
def test_mamba_layers_with_and_without_a_feed_forward_train_on_shakespeare(tfds_dir, tmp_path):
  # No attention: Mamba is the only mixer; the first layer is MoE-Mamba. Narrow (Din = D, N = 4)
  # to keep the test quick.
  workdir = str(tmp_path / 'run')
  config = run_config(tfds_dir, model=dict(pattern='mamba:moe,mamba',
                                           mamba=dict(expand=1, d_state=4)),
                      train=dict(eval_every=40, checkpoint_every=40))
  final = train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  losses = [r['train_loss'] for r in rows if 'train_loss' in r]
  assert len(losses) == 4 and losses[-1] < losses[0] - 0.5   # from ~4.1 (uniform) downwards
  assert final['val_loss'] < np.log(65) - 0.5
