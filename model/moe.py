"""Mixture-of-Experts feed-forward: a learned router sends each token to its top_k experts.

Pattern entries `...:moe` use it (`attn:moe*4`, `attn:mlp,attn:moe`); `model.moe.*` configures it.

Routing is token choice: router logits (float32, as ST-MoE advises) -> softmax probabilities ->
each token's top_k experts, whose weights are renormalised to sum to 1 (GShard, Mixtral) unless
`moe.renormalize` is off (Switch). `moe.num_shared_experts` more experts run on every token
(DeepSeekMoE); they are one dense MLP of that many experts' width.

The experts run one of two ways:
- capacity_factor > 0: each expert takes at most C = ceil(capacity_factor * L * top_k / E)
  assignments per sequence of L tokens (one routing group per sequence, as GShard's groups).
  Assignments claim an expert's slots in token order; those past C are dropped: the token gets
  nothing from that expert, and if all its experts are full its residual passes through the
  block unchanged. One-hot dispatch and combine tensors (B, L, E, C) move tokens in and out of
  the per-expert buffers (B, E, C, D) as einsums (GShard, Switch).
- capacity_factor == 0, dropless: every assignment is computed. Assignments sorted by expert go
  through grouped matmuls, one group per expert (`jax.lax.ragged_dot`, MegaBlocks-style).

Slots are claimed in token order, so whether a token is dropped depends only on the tokens before
it in its sequence: the layer stays causal. Decode mode keeps each row's filled slots in the
'cache' collection (C from the cache length), so cached decoding computes what the full forward
pass over the same buffer computes, drops included; evaluation runs the training function as is.

Auxiliary losses, weighted, go to the 'aux_loss' collection (the train step adds them to the loss):
the Switch load-balancing loss E * sum_i f_i * P_i (f_i the fraction of assignments routed to
expert i, P_i its mean router probability) and the ST-MoE router z-loss mean(logsumexp(logits)^2).
The 'metrics' collection gets each expert's share f_i, the dropped fraction and both losses
unweighted (metrics.jsonl keys `layers/layer_<i>/ffn/...`).

Shapes: E experts, K the top_k experts of a token (here K is not the kv heads), C slots per expert,
A assignments (tokens x K), F one expert's width.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.blocks import AUX_LOSS, METRICS
from model.registry import Layer, register_ffn
from model.config import ModelConfig, MoEConfig
from model.ffn import MLP
from model.layers import activation, compute_dtype, normal, output_std, param_init


def expert_width(cfg: ModelConfig) -> int:
  """F of one expert: model.moe.d_ff, or the model's feed-forward width."""
  return cfg.moe.d_ff or cfg.ff_width


def capacity(moe: MoEConfig, length: int) -> int:
  """Slots per expert for a sequence of `length` tokens: its fair share of the length * top_k
  assignments, times the capacity factor."""
  return math.ceil(moe.capacity_factor * length * moe.top_k / moe.num_experts)


def route(logits_BxLxE, top_k: int, renormalize: bool):
  """(probabilities (B, L, E), weights (B, L, K), experts (B, L, K)): each token's top_k experts
  in decreasing probability, with the weights its output mixes them by."""
  probs_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
  weights_BxLxK, experts_BxLxK = jax.lax.top_k(probs_BxLxE, top_k)
  if renormalize:
    weights_BxLxK = weights_BxLxK / jnp.sum(weights_BxLxK, axis=-1, keepdims=True)
  return probs_BxLxE, weights_BxLxK, experts_BxLxK


def expert_shares(experts_BxLxK, num_experts: int):
  """f_i: the fraction of all token-to-expert assignments that go to expert i, (E,)."""
  return jnp.mean(jax.nn.one_hot(experts_BxLxK, num_experts), axis=(0, 1, 2))


def load_balancing_loss(probs_BxLxE, experts_BxLxK):
  """Switch Transformer's E * sum_i f_i * P_i. 1 for a uniform router and for balanced routing;
  its gradient (through P_i) pushes probability away from overloaded experts."""
  E = probs_BxLxE.shape[-1]
  share_E = expert_shares(experts_BxLxK, E)
  return E * jnp.sum(share_E * jnp.mean(probs_BxLxE, axis=(0, 1)))


def router_z_loss(logits_BxLxE):
  """ST-MoE's z-loss: the mean squared log-partition of the router; keeps logits small."""
  return jnp.mean(jax.nn.logsumexp(logits_BxLxE, axis=-1) ** 2)


def dispatch_and_combine(experts_BxLxK, weights_BxLxK, num_experts: int, capacity: int,
                         filled_BxE):
  """The capacity path's routing tensors, one routing group per row.

  Each assignment (token l, choice k) takes the next free slot of its expert, in token order;
  `filled_BxE` slots are already taken by earlier calls (decode). Assignments past `capacity` are
  dropped. The slots this call fills are numbered from 0, so its buffers hold min(capacity, L).

  Returns dispatch (B, L, E, C) in {0, 1}, combine (B, L, E, C) = dispatch * weight, kept
  (B, L, K) in {0, 1}, and the number of assignments made to each expert (B, E), dropped or not.
  """
  B, L, K = experts_BxLxK.shape
  onehot_BxLxKxE = jax.nn.one_hot(experts_BxLxK, num_experts, dtype=jnp.int32)
  onehot_BxAxE = onehot_BxLxKxE.reshape(B, L * K, num_experts)  # token-major order
  rank_BxAxE = jnp.cumsum(onehot_BxAxE, axis=1) - onehot_BxAxE  # earlier ones in this call
  rank_BxLxK = jnp.sum(rank_BxAxE * onehot_BxAxE, axis=-1).reshape(B, L, K)
  filled_BxLxK = jnp.sum(onehot_BxLxKxE * filled_BxE[:, None, None, :], axis=-1)
  kept_BxLxK = (filled_BxLxK + rank_BxLxK < capacity).astype(jnp.float32)
  # A token uses an expert at most once, so the call's rank is below L: min(capacity, L) slots.
  slot_BxLxKxC = jax.nn.one_hot(rank_BxLxK, min(capacity, L), dtype=jnp.float32)
  routed_BxLxKxE = onehot_BxLxKxE.astype(jnp.float32) * kept_BxLxK[..., None]
  dispatch_BxLxExC = jnp.einsum('blke,blkc->blec', routed_BxLxKxE, slot_BxLxKxC)
  combine_BxLxExC = jnp.einsum('blke,blkc,blk->blec', routed_BxLxKxE, slot_BxLxKxC,
                               weights_BxLxK)
  return dispatch_BxLxExC, combine_BxLxExC, kept_BxLxK, jnp.sum(onehot_BxLxKxE, axis=(1, 2))


class ExpertDense(nn.Module):
  """E projections side by side: kernel (E, I, O) and bias (E, O), on the 'exp' axis.

  Applies to per-expert buffers x (B, E, C, I), or, given `group_sizes_E`, to rows sorted by
  expert x (A, I) as grouped matmuls (`expert_A` names each row's expert, for the bias)."""
  config: ModelConfig
  features: int
  axes: tuple[str, str]  # logical names of I and O
  std: float

  @nn.compact
  def __call__(self, x, group_sizes_E=None, expert_A=None):
    cfg = self.config
    E, dtype = cfg.moe.num_experts, compute_dtype(cfg)
    kernel = self.param('kernel', param_init(normal(self.std), ('exp', *self.axes)),
                        (E, x.shape[-1], self.features), jnp.float32).astype(dtype)
    if group_sizes_E is None:
      y = jnp.einsum('beci,eio->beco', x, kernel)
    else:
      y = jax.lax.ragged_dot(x, kernel, group_sizes_E)
    if not cfg.use_bias:
      return y
    bias_ExO = self.param('bias', param_init(nn.initializers.zeros, ('exp', self.axes[1])),
                          (E, self.features), jnp.float32).astype(dtype)
    return y + (bias_ExO[:, None] if group_sizes_E is None else bias_ExO[expert_A])


class Experts(nn.Module):
  """The E expert MLPs (the model's activation, D -> F -> D), on buffers or sorted rows."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, group_sizes_E=None, expert_A=None):
    cfg = self.config
    F = expert_width(cfg)
    groups = dict(group_sizes_E=group_sizes_E, expert_A=expert_A)

    def up(name):
      return ExpertDense(cfg, F, ('embed', 'mlp'), cfg.init_std, name=name)(x, **groups)

    act = activation(cfg.activation)
    h = act(up('wi_gate')) * up('wi_up') if cfg.activation == 'swiglu' else act(up('wi'))
    return ExpertDense(cfg, cfg.d_model, ('mlp', 'embed'), output_std(cfg), name='wo')(h, **groups)


def dropless(experts: Experts, x_BxLxD, weights_BxLxK, experts_BxLxK):
  """Every assignment computed: rows sorted by expert through grouped matmuls, then unsorted and
  mixed by the routing weights."""
  B, L, D = x_BxLxD.shape
  K, E = experts_BxLxK.shape[-1], experts.config.moe.num_experts
  expert_A = experts_BxLxK.reshape(-1)                    # A = B * L * K assignments, token-major
  order_A = jnp.argsort(expert_A, stable=True)
  group_sizes_E = jnp.bincount(expert_A, length=E).astype(jnp.int32)
  x_AxD = x_BxLxD.reshape(B * L, D)[order_A // K]
  y_AxD = experts(x_AxD, group_sizes_E=group_sizes_E, expert_A=expert_A[order_A])
  y_BxLxKxD = jnp.zeros_like(y_AxD).at[order_A].set(y_AxD).reshape(B, L, K, D)
  return jnp.einsum('blkd,blk->bld', y_BxLxKxD, weights_BxLxK.astype(y_AxD.dtype))


@register_ffn('moe', position_wise=False)  # capacity: earlier tokens claim slots
class MoE(Layer):

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg, moe = self.config, self.config.moe
    E, dtype = moe.num_experts, compute_dtype(cfg)
    # The router is used whole by every token: no 'exp' axis, so it counts as active.
    router_DxE = self.param('router', param_init(normal(cfg.init_std), ('embed', None)),
                            (cfg.d_model, E), jnp.float32)
    logits_BxLxE = jnp.einsum('bld,de->ble', x_BxLxD.astype(jnp.float32), router_DxE)
    probs_BxLxE, weights_BxLxK, experts_BxLxK = route(logits_BxLxE, moe.top_k, moe.renormalize)

    experts = Experts(cfg, name='experts')
    if moe.capacity_factor > 0:
      y_BxLxD, kept_BxLxK = self._with_capacity(experts, x_BxLxD, weights_BxLxK, experts_BxLxK)
    else:
      y_BxLxD = dropless(experts, x_BxLxD, weights_BxLxK, experts_BxLxK)
      kept_BxLxK = jnp.ones(experts_BxLxK.shape, jnp.float32)
    if moe.num_shared_experts:
      shared = cfg.replace(d_ff=moe.num_shared_experts * expert_width(cfg))
      y_BxLxD = y_BxLxD + MLP(shared, name='shared_experts')(x_BxLxD)

    balance = load_balancing_loss(probs_BxLxE, experts_BxLxK)
    z = router_z_loss(logits_BxLxE)
    self.sow(AUX_LOSS, 'load_balancing', moe.aux_loss_weight * balance)
    self.sow(AUX_LOSS, 'router_z', moe.z_loss_weight * z)
    self.sow(METRICS, 'expert_share', expert_shares(experts_BxLxK, E))
    self.sow(METRICS, 'dropped_fraction', 1.0 - jnp.mean(kept_BxLxK))
    self.sow(METRICS, 'load_balancing_loss', balance)
    self.sow(METRICS, 'router_z_loss', z)
    return y_BxLxD.astype(dtype)

  def _with_capacity(self, experts: Experts, x_BxLxD, weights_BxLxK, experts_BxLxK):
    """Dispatch into per-expert buffers, run the experts, combine: (y (B, L, D), kept (B, L, K))."""
    B, L, _ = x_BxLxD.shape
    E = self.config.moe.num_experts
    C = capacity(self.config.moe, L)
    filled_BxE = jnp.zeros((B, E), jnp.int32)
    initialised = False
    if self.decode:
      # Which of each expert's C slots a row has filled. Created at `init` with the cache length
      # (so its shape holds C), then carried from call to call.
      initialised = self.has_variable('cache', 'filled_slots')
      slots = self.variable('cache', 'filled_slots', jnp.zeros, (B, E, C), jnp.bool_)
      if initialised:
        C = slots.value.shape[-1]
        filled_BxE = jnp.sum(slots.value, axis=-1, dtype=jnp.int32)
    dispatch_BxLxExC, combine_BxLxExC, kept_BxLxK, assigned_BxE = dispatch_and_combine(
        experts_BxLxK, weights_BxLxK, E, C, filled_BxE)
    if self.decode and initialised:
      slots.value = jnp.arange(C) < (filled_BxE + assigned_BxE)[..., None]
    dtype = x_BxLxD.dtype
    x_BxExCxD = jnp.einsum('blec,bld->becd', dispatch_BxLxExC.astype(dtype), x_BxLxD)
    y_BxExCxD = experts(x_BxExCxD)
    y_BxLxD = jnp.einsum('blec,becd->bld', combine_BxLxExC.astype(dtype), y_BxExCxD)
    return y_BxLxD, kept_BxLxK
