"""Mixture of Experts: routing, capacity, the two expert paths, losses, decoding and training."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.decode import Sampling
from model import LM, count_params, training_flops_per_token
from model.blocks import AUX_LOSS, METRICS
from model.config import ConfigError, MoEConfig
from model.ffn import MLP
from model.moe import (Experts, MoE, dispatch_and_combine, load_balancing_loss, route,
                       router_z_loss)
from train.loop import flatten_layer_metrics, train_and_evaluate
from tests.conftest import run_config, tiny
from tests.test_decode import assert_generation_equals_uncached, setup


def moe_cfg(**moe):
  """A tiny model whose single layer is attention + MoE (expert width 32)."""
  kw = dict(num_experts=4, top_k=2, d_ff=32)
  kw.update(moe)
  return tiny(pattern='attn:moe', moe=MoEConfig(**kw))


def init_moe(cfg, x_BxLxD, seed=0):
  """Random MoE parameters (router and biases too, so that routing and bias mix-ups show), made
  without compiling the layer's init."""
  shapes = nn.unbox(jax.eval_shape(MoE(cfg).init, jax.random.key(0), x_BxLxD))['params']
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return tree.unflatten([0.2 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])


def apply_moe(cfg, params, x_BxLxD):
  """MoE output and its sown collections, jitted."""
  return jax.jit(lambda p, x: MoE(cfg).apply({'params': p}, x, mutable=[AUX_LOSS, METRICS]))(
      params, x_BxLxD)


@pytest.mark.parametrize('capacity_factor, activation, use_bias', [(1.0, 'swiglu', False),
                                                                   (0.0, 'gelu', True)])
def test_one_expert_with_top_1_equals_the_dense_feed_forward(capacity_factor, activation,
                                                             use_bias):
  common = dict(pattern='attn:mlp', activation=activation, use_bias=use_bias)
  dense_cfg = tiny(**common)
  moe_cfg_ = tiny(**dict(common, pattern='attn:moe'),
                  moe=MoEConfig(num_experts=1, top_k=1, capacity_factor=capacity_factor))
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 61)
  dense = nn.unbox(jax.jit(LM(dense_cfg).init)(jax.random.key(0), tokens))['params']
  layer = dense['blocks']['layer_0']  # its MLP becomes the only expert, behind a router
  moe = dict(dense, blocks={'layer_0': dict(layer, ffn={
      'router': jnp.zeros((32, 1)), 'experts': jax.tree.map(lambda x: x[None], layer['ffn'])})})
  assert jax.tree.structure(moe) == jax.tree.structure(
      nn.unbox(jax.eval_shape(LM(moe_cfg_).init, jax.random.key(0), tokens))['params'])
  np.testing.assert_allclose(jax.jit(LM(moe_cfg_).apply)({'params': moe}, tokens),
                             jax.jit(LM(dense_cfg).apply)({'params': dense}, tokens),
                             atol=1e-5, rtol=1e-5)


def test_capacity_drops_exactly_the_assignments_past_it_in_token_order():
  # Row 0 sends 5 of its 8 tokens to expert 0, row 1 spreads its tokens evenly; E = 4, top-1,
  # capacity factor 1: C = ceil(8 / 4) = 2 slots per expert and row.
  experts_BxLxK = jnp.asarray([[0, 0, 1, 0, 2, 0, 3, 0], [3, 2, 1, 0, 0, 1, 2, 3]])[..., None]
  weights_BxLxK = jnp.full((2, 8, 1), 0.5)
  dispatch_fn = jax.jit(dispatch_and_combine, static_argnums=(2, 3))
  dispatch, combine, kept, assigned = dispatch_fn(experts_BxLxK, weights_BxLxK, 4, 2,
                                                  jnp.zeros((2, 4), jnp.int32))
  np.testing.assert_array_equal(kept[..., 0], [[1, 1, 1, 0, 1, 0, 1, 0], [1] * 8])
  assert dispatch.shape == (2, 8, 4, 2)
  # Kept assignments fill their expert's slots 0, 1 in token order; a slot holds one token.
  np.testing.assert_array_equal(np.argwhere(np.asarray(dispatch[0])),
                                [[0, 0, 0], [1, 0, 1], [2, 1, 0], [4, 2, 0], [6, 3, 0]])
  np.testing.assert_array_equal(jnp.sum(dispatch, axis=1), [[[1, 1], [1, 0], [1, 0], [1, 0]],
                                                            [[1, 1]] * 4])
  np.testing.assert_array_equal(combine, 0.5 * dispatch)
  np.testing.assert_array_equal(assigned, [[5, 1, 1, 1], [2, 2, 2, 2]])

  # Decode: the same row fed one token at a time, the filled slots carried between calls, drops
  # the same tokens.
  filled = jnp.zeros((1, 4), jnp.int32)
  for t in range(8):
    _, _, kept_t, assigned_t = dispatch_fn(experts_BxLxK[:1, t:t + 1],
                                           weights_BxLxK[:1, t:t + 1], 4, 2, filled)
    assert float(kept_t[0, 0, 0]) == float(kept[0, t, 0])
    filled = filled + assigned_t


def test_the_layer_passes_dropped_tokens_through_and_keeps_the_rest():
  """A router built to send row 0's tokens 0, 1, 3, 5, 7 to expert 0: with two slots, its tokens
  3, 5, 7 get no output (their residual passes through); every other token gets exactly what
  the dropless layer gives it."""
  cfg = moe_cfg(top_k=1, capacity_factor=1.0)
  route_BxL = jnp.asarray([[0, 0, 1, 0, 2, 0, 3, 0], [3, 2, 1, 0, 0, 1, 2, 3]])
  noise = 0.1 * jax.random.normal(jax.random.key(0), (2, 8, 32))
  x_BxLxD = noise.at[..., :4].set(3.0 * jax.nn.one_hot(route_BxL, 4))
  params = init_moe(cfg, x_BxLxD)
  params['router'] = jnp.zeros((32, 4)).at[:4].set(10.0 * jnp.eye(4))
  y, cols = apply_moe(cfg, params, x_BxLxD)
  y_all, _ = apply_moe(moe_cfg(top_k=1, capacity_factor=0.0), params, x_BxLxD)
  dropped = np.zeros((2, 8), bool)
  dropped[0, [3, 5, 7]] = True
  np.testing.assert_array_equal(y[dropped], 0.0)
  np.testing.assert_allclose(y[~dropped], y_all[~dropped], atol=1e-6)
  assert np.all(np.abs(np.asarray(y_all[dropped])) > 0)
  np.testing.assert_allclose(cols[METRICS]['dropped_fraction'][0], 3 / 16)
  np.testing.assert_allclose(cols[METRICS]['expert_share'][0], [7 / 16, 3 / 16, 3 / 16, 3 / 16])


def test_renormalised_combine_weights_sum_to_one_without_drops():
  logits = jax.random.normal(jax.random.key(0), (3, 10, 8))

  @jax.jit
  def routing(logits):
    probs, weights, experts = route(logits, 3, renormalize=True)
    # Capacity factor E / K gives C = L: no expert can overflow.
    _, combine, kept, _ = dispatch_and_combine(experts, weights, 8, 10,
                                               jnp.zeros((3, 8), jnp.int32))
    return probs, experts, combine, kept, route(logits, 3, renormalize=False)[1]

  probs, experts, combine, kept, raw = routing(logits)
  np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(experts, jnp.argsort(-logits, axis=-1)[..., :3])
  assert np.all(np.asarray(kept) == 1)
  np.testing.assert_allclose(jnp.sum(combine, axis=(2, 3)), 1.0, rtol=1e-6)
  # Without renormalisation the weights are the probabilities themselves (Switch).
  np.testing.assert_allclose(raw, jnp.sort(probs, axis=-1)[..., ::-1][..., :3], rtol=1e-6)


def test_load_balancing_and_z_losses():
  @jax.jit
  def losses():
    uniform = load_balancing_loss(jax.nn.softmax(jnp.zeros((2, 6, 8))),
                                  jax.random.randint(jax.random.key(0), (2, 6, 2), 0, 8))
    # Everything on expert 0, with all its probability: E * 1 * 1, the worst imbalance.
    collapsed = load_balancing_loss(jax.nn.one_hot(jnp.zeros((2, 6), jnp.int32), 8),
                                    jnp.zeros((2, 6, 1), jnp.int32))
    # Balanced assignments give 1 whatever the probabilities.
    balanced = load_balancing_loss(jax.nn.softmax(jax.random.normal(jax.random.key(1), (2, 8, 8))),
                                   jnp.arange(16).reshape(2, 8, 1) % 8)
    return uniform, collapsed, balanced, router_z_loss(jnp.zeros((2, 6, 8)))

  np.testing.assert_allclose(losses(), [1.0, 8.0, 1.0, np.log(8) ** 2], rtol=1e-6)


def test_top_1_router_learns_from_the_loss_only_without_renormalisation():
  """(Top-2 routers get gradient from the loss: see the dropless test.) Top-1 renormalised
  weights are all 1 (w / w), so only the auxiliary losses reach that router; Switch's
  unrenormalised top-1 weight passes the loss's gradient on."""
  x_BxLxD = jax.random.normal(jax.random.key(0), (2, 8, 32))
  target = jax.random.normal(jax.random.key(1), (2, 8, 32))

  def router_grads(cfg):
    params = init_moe(cfg, x_BxLxD)

    def losses(p):  # the main loss, and the main loss plus the auxiliary losses
      y, cols = MoE(cfg).apply({'params': p}, x_BxLxD, mutable=[AUX_LOSS])
      main = jnp.sum(y * target)
      return main, main + sum(jnp.sum(a) for a in jax.tree.leaves(cols))
    return [g['router'] for g in jax.jit(jax.jacrev(losses))(params)]

  switch, _ = router_grads(moe_cfg(top_k=1, renormalize=False))
  main, with_aux = router_grads(moe_cfg(top_k=1))
  assert np.abs(switch).min() > 0 and np.abs(with_aux).min() > 0
  assert np.abs(main).max() < 1e-6 * np.abs(switch).mean()


def dense_reference(cfg, params, x_BxLxD):
  """Every expert run on every token, each token's top_k outputs mixed by its weights, plus the
  shared experts."""
  E, B, L, D = cfg.moe.num_experts, *x_BxLxD.shape
  logits = jnp.einsum('bld,de->ble', x_BxLxD, params['router'])
  _, weights_BxLxK, experts_BxLxK = route(logits, cfg.moe.top_k, cfg.moe.renormalize)
  all_BxExLxD = Experts(cfg).apply({'params': params['experts']},
                                   jnp.broadcast_to(x_BxLxD[:, None], (B, E, L, D)))
  picked_BxLxKxD = jnp.take_along_axis(all_BxExLxD.transpose(0, 2, 1, 3)[:, :, None],
                                       experts_BxLxK[..., None, None], axis=3)[:, :, :, 0]
  y_BxLxD = jnp.einsum('blkd,blk->bld', picked_BxLxKxD, weights_BxLxK)
  if cfg.moe.num_shared_experts:
    width = cfg.replace(d_ff=cfg.moe.num_shared_experts * cfg.moe.d_ff)
    y_BxLxD = y_BxLxD + MLP(width).apply({'params': params['shared_experts']}, x_BxLxD)
  return y_BxLxD


@pytest.mark.parametrize('activation, use_bias, shared', [('swiglu', False, 0), ('gelu', True, 2)])
def test_dropless_grouped_matmuls_equal_the_dense_dispatch(activation, use_bias, shared):
  kw = dict(activation=activation, use_bias=use_bias, pattern='attn:moe')
  moe = dict(num_experts=4, top_k=2, d_ff=32, num_shared_experts=shared)
  dropless_cfg = tiny(**kw, moe=MoEConfig(**moe, capacity_factor=0.0))
  dispatch_cfg = tiny(**kw, moe=MoEConfig(**moe, capacity_factor=2.0))  # E / K: never drops
  x_BxLxD = jax.random.normal(jax.random.key(0), (3, 8, 32))
  params = init_moe(dropless_cfg, x_BxLxD)

  def loss(cfg, p):
    y, _ = MoE(cfg).apply({'params': p}, x_BxLxD, mutable=[AUX_LOSS, METRICS])
    return jnp.sum(jnp.sin(y)), y

  (_, y_dropless), g_dropless = jax.jit(jax.value_and_grad(
      lambda p: loss(dropless_cfg, p), has_aux=True))(params)
  (_, y_dispatch), g_dispatch = jax.jit(jax.value_and_grad(
      lambda p: loss(dispatch_cfg, p), has_aux=True))(params)
  expected = jax.jit(lambda p, x: dense_reference(dropless_cfg, p, x))(params, x_BxLxD)
  np.testing.assert_allclose(y_dropless, expected, atol=1e-5)
  np.testing.assert_allclose(y_dispatch, expected, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_dropless), jax.tree.leaves(g_dispatch)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert np.abs(g_dropless['router']).min() > 0  # the top-k weights pass gradient to the router
  if shared:
    return

  # bfloat16 compute stays close to float32 on both paths.
  for cfg, y in ((dropless_cfg, y_dropless), (dispatch_cfg, y_dispatch)):
    y16, _ = apply_moe(cfg.replace(dtype='bfloat16'), params, x_BxLxD.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(y16.astype(jnp.float32), y, atol=0.05 * float(jnp.std(y)) + 1e-3)


def test_scanned_moe_layers_equal_unscanned_and_report_per_layer_metrics():
  scanned_cfg = moe_cfg().replace(pattern='attn:moe*2', scan_layers=True)
  plain_cfg = scanned_cfg.replace(scan_layers=False)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 61)
  scanned = nn.unbox(jax.jit(LM(scanned_cfg).init)(jax.random.key(0), tokens))['params']
  run = scanned['blocks']['layers_0_to_1']
  plain = dict(scanned, blocks={f'layer_{i}': jax.tree.map(lambda x: x[i], run) for i in (0, 1)})

  def forward(cfg, params):
    return jax.jit(lambda p: LM(cfg).apply({'params': p}, tokens, mutable=[AUX_LOSS, METRICS]))(
        params)

  (logits_s, cols_s), (logits_p, cols_p) = forward(scanned_cfg, scanned), forward(plain_cfg, plain)
  np.testing.assert_allclose(logits_s, logits_p, rtol=1e-5, atol=1e-6)
  assert run['ffn']['experts']['wi_gate']['kernel'].shape == (2, 4, 32, 32)  # (layers, E, D, F)
  # The train step stacks metrics over steps: flatten reads the last step's values.
  flat_s, flat_p = (flatten_layer_metrics(jax.tree.map(lambda x: x[None], cols[METRICS]))
                    for cols in (cols_s, cols_p))
  assert flat_s.keys() == flat_p.keys() == {
      f'layers/layer_{i}/ffn/{name}' for i in (0, 1)
      for name in ('dropped_fraction', 'load_balancing_loss', 'router_z_loss',
                   *(f'expert_share/{e}' for e in range(4)))}
  np.testing.assert_allclose([flat_s[k] for k in sorted(flat_s)],
                             [flat_p[k] for k in sorted(flat_s)], rtol=1e-5)
  np.testing.assert_allclose(sum(flat_s[f'layers/layer_1/ffn/expert_share/{e}']
                                 for e in range(4)), 1.0, rtol=1e-6)
  aux = lambda cols: sum(float(jnp.sum(x)) for x in jax.tree.leaves(cols[AUX_LOSS]))
  np.testing.assert_allclose(aux(cols_s), aux(cols_p), rtol=1e-5)
  np.testing.assert_allclose(aux(cols_s), sum(
      0.01 * flat_s[f'layers/layer_{i}/ffn/load_balancing_loss']
      + 0.001 * flat_s[f'layers/layer_{i}/ffn/router_z_loss'] for i in (0, 1)), rtol=1e-5)


def test_cached_generation_equals_uncached_token_for_token_drops_included():
  cfg = moe_cfg(capacity_factor=0.5).replace(pattern='attn:moe*2', scan_layers=True)
  model, params = setup(cfg)
  cached, _ = assert_generation_equals_uncached(model, params, max_new_tokens=11,
                                                sampling=Sampling(1.0))
  _, cols = jax.jit(lambda p, t: model.apply({'params': p}, t, mutable=[METRICS]))(params, cached)
  flat = flatten_layer_metrics(jax.tree.map(lambda x: x[None], cols[METRICS]))
  fractions = np.asarray([v for k, v in flat.items() if k.endswith('dropped_fraction')])
  assert fractions.min() > 0  # both layers really drop tokens


def test_counts_know_total_and_active_experts():
  D, F = 32, 48
  dense = tiny(pattern='attn:none', d_ff=F)
  moe = tiny(pattern='attn:moe', moe=MoEConfig(num_experts=8, top_k=2, d_ff=F))
  shared = tiny(pattern='attn:moe', moe=MoEConfig(num_experts=8, top_k=2, d_ff=F,
                                                  num_shared_experts=1))
  expert, router, norm = 3 * D * F, D * 8, D
  base = count_params(dense)
  assert count_params(moe).non_embedding == base.non_embedding + 8 * expert + router + norm
  assert count_params(moe).active_non_embedding == base.non_embedding + 2 * expert + router + norm
  assert count_params(shared).active_non_embedding == (count_params(moe).active_non_embedding
                                                       + expert)
  # Training FLOPs follow the active parameters: two experts' worth, not eight.
  extra = training_flops_per_token(moe, 16) - training_flops_per_token(dense, 16)
  assert extra == 6 * (2 * expert + router + norm)


@pytest.mark.parametrize('moe, message', [
    (dict(top_k=3, num_experts=2), r'model.moe.top_k=3 must be between 1 and'),
    (dict(capacity_factor=-1.0), r'model.moe.capacity_factor must be >= 0'),
    (dict(num_shared_experts=-1), r'model.moe.num_shared_experts must be >= 0'),
    (dict(d_ff=0), r'model.moe.d_ff must be positive'),
    (dict(aux_loss_weight=-0.1), r'model.moe.aux_loss_weight must be >= 0'),
])
def test_bad_moe_settings_name_the_field(moe, message):
  with pytest.raises(ConfigError, match=message):
    tiny(pattern='attn:moe', moe=MoEConfig(**moe))


@pytest.mark.slow
def test_an_moe_model_trains_on_shakespeare_and_logs_its_experts(tfds_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  config = run_config(tfds_dir, model=dict(pattern='attn:mlp,attn:moe*2', scan_layers=True,
                                           moe=dict(num_experts=4, top_k=2, d_ff=32)),
                      train=dict(eval_every=0, checkpoint_every=0))
  final = train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if 'train_loss' in r]
  assert train_rows[-1]['train_loss'] < train_rows[0]['train_loss'] - 0.5
  assert final['val_loss'] < np.log(65) - 0.5
  last = train_rows[-1]
  for layer in (1, 2):
    keys = [f'layers/layer_{layer}/ffn/expert_share/{e}' for e in range(4)]
    np.testing.assert_allclose(sum(last[k] for k in keys), 1.0, rtol=1e-5)
    assert 0 <= last[f'layers/layer_{layer}/ffn/dropped_fraction'] < 0.5
  assert not any(k.startswith('layers/layer_0/') for k in last)  # the dense layer reports nothing
  np.testing.assert_allclose(last['aux_loss'], sum(
      0.01 * last[f'layers/layer_{i}/ffn/load_balancing_loss']
      + 0.001 * last[f'layers/layer_{i}/ffn/router_z_loss'] for i in (1, 2)), rtol=1e-4)
