"""Mamba-2 (Dao & Gu 2024): the SSD algorithm and the Mamba-2 mixer built around it.

`ssd` computes, per head h (a P x N state), with A a scalar per head:

    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t        y_t = h_t C_t

as the paper's chunked state-space duality: the length is cut into chunks of `chunk_size` steps;
within a chunk the output is a masked (causal, decaying) attention-like matrix product, the
"quadratic" form; each chunk's contribution to the state is another matrix product; the states
cross chunks in a short recurrence over chunks; and each chunk reads the state it starts from
with one more product. Every step is a matmul, so it runs at matmul speed, unlike Mamba-1's
elementwise scan (model/ssm.py).

The mixer (`mamba2` in a block pattern): one input projection to z, x, B, C and Δ (held as five
kernels so that each carries its own logical axes: heads shard on 'tensor'), a causal depthwise
conv over x, B and C, SiLU, SSD with the D skip, a gated RMSNorm with z, the output projection.
In decode mode it keeps (conv states, SSM state) in the 'cache' collection: O(1) work per token.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.registry import Layer, register_mixer
from model.config import ModelConfig
from model.layers import (ACT_BLHD, compute_dtype, dense, inverse_softplus_dt, output_std,
                          param_init, symmetric_uniform)

# The contractions promise float32: accelerators may run float32 matmuls at reduced precision
# (TF32, one bfloat16 pass) by default.
_HIGHEST = jax.lax.Precision.HIGHEST


def ssd(x, dt, A, B, C, *, chunk_size: int, initial_state=None, return_final_state=False):
  """The SSD recurrence of Mamba-2, channels last, computed in float32.

  x: (batch, L, H, P); dt: (batch, L, H) positive step sizes (softplus and bias applied);
  A: (H,) negative; B, C: (batch, L, G, N) with G dividing H (head h reads group h // (H / G));
  initial_state: (batch, H, P, N), the state before the first step (zeros if None). Returns y
  (batch, L, H, P) in x's dtype, and with `return_final_state` also the state after the last
  step (batch, H, P, N) in float32 (float64 inputs compute in float64, as the tests do). L need
  not be a multiple of `chunk_size`: the last chunk is padded with Δ = 0 steps, which neither
  decay the state (exp(0 A) = 1) nor add to it.
  """
  if chunk_size < 1:
    raise ValueError(f'ssd: chunk_size must be a positive number of steps, got {chunk_size}')
  batch, length, H, P = x.shape
  G, N = B.shape[-2:]
  if H % G:
    raise ValueError(f'ssd: the {G} groups of B and C must divide the {H} heads')
  expected = dict(dt=(batch, length, H), A=(H,), B=(batch, length, G, N),
                  C=(batch, length, G, N), initial_state=(batch, H, P, N))
  given = dict(dt=dt, A=A, B=B, C=C, initial_state=initial_state)
  for name, array in given.items():
    if array is not None and array.shape != expected[name]:
      raise ValueError(f'ssd: {name} has shape {array.shape}, expected {expected[name]} for x '
                       f'of shape {x.shape} and B of shape {B.shape}')

  dtype = jnp.promote_types(x.dtype, jnp.float32)
  f32 = lambda a: a.astype(dtype)
  einsum = lambda *a: jnp.einsum(*a, precision=_HIGHEST, preferred_element_type=dtype)
  R = H // G  # heads per group
  c = min(chunk_size, length)
  pad = -length % c
  nc = (length + pad) // c

  # Heads before steps, so that every product below is a batched matmul without transposes.
  x_BxKxGxRxQxP = jnp.moveaxis(_chunk(f32(x), pad, c).reshape(batch, nc, c, G, R, P), 2, 4)
  dt_BxKxGxRxQ = jnp.moveaxis(_chunk(f32(dt), pad, c).reshape(batch, nc, c, G, R), 2, 4)
  B_BxKxGxQxN = jnp.moveaxis(_chunk(f32(B), pad, c), 2, 3)
  C_BxKxGxQxN = jnp.moveaxis(_chunk(f32(C), pad, c), 2, 3)
  A_GxR = f32(A).reshape(G, R)

  # Cumulative log-decay within each chunk: a_l = sum_{s <= l} Δ_s A (non-increasing).
  a_BxKxGxRxQ = jnp.cumsum(dt_BxKxGxRxQ * A_GxR[..., None], axis=-1)
  xdt_BxKxGxRxQxP = x_BxKxGxRxQxP * dt_BxKxGxRxQ[..., None]

  # 1. Within chunks, the quadratic form: y_l = sum_{s <= l} exp(a_l - a_s) (C_l . B_s) Δ_s x_s.
  # Differences of one chunk's cumulative sums: these sums stay small (Q steps of Δ A), so they
  # keep float32's precision without the paper's segment-sum of masked cumulative sums. Masked
  # (l < s) entries are exp(-inf) = 0, whose gradient is 0 too.
  causal_QxQ = jnp.tril(jnp.ones((c, c), bool))
  diff = a_BxKxGxRxQ[..., :, None] - a_BxKxGxRxQ[..., None, :]
  decay_BxKxGxRxQxQ = jnp.exp(jnp.where(causal_QxQ, diff, -jnp.inf))
  CB_BxKxGxQxQ = einsum('bkgln,bkgsn->bkgls', C_BxKxGxQxN, B_BxKxGxQxN)
  scores_BxKxGxRxQxQ = CB_BxKxGxQxQ[:, :, :, None] * decay_BxKxGxRxQxQ
  y_BxKxGxRxQxP = einsum('bkgrls,bkgrsp->bkgrlp', scores_BxKxGxRxQxQ, xdt_BxKxGxRxQxP)

  # 2. Each chunk's own state at its end: sum_s exp(a_last - a_s) Δ_s x_s ⊗ B_s.
  to_end_BxKxGxRxQ = jnp.exp(a_BxKxGxRxQ[..., -1:] - a_BxKxGxRxQ)
  states_BxKxGxRxPxN = einsum('bkgrsp,bkgsn->bkgrpn',
                              xdt_BxKxGxRxQxP * to_end_BxKxGxRxQ[..., None], B_BxKxGxQxN)

  # 3. Across chunks: the state entering chunk k + 1 is exp(a_last of k) x (state entering k) +
  # chunk k's own state; a short scan over the L / Q chunks.
  chunk_decay_KxBxGxR = jnp.moveaxis(jnp.exp(a_BxKxGxRxQ[..., -1]), 1, 0)
  own_KxBxGxRxPxN = jnp.moveaxis(states_BxKxGxRxPxN, 1, 0)

  def across(h_BxGxRxPxN, inputs):
    decay_BxGxR, own_BxGxRxPxN = inputs
    return decay_BxGxR[..., None, None] * h_BxGxRxPxN + own_BxGxRxPxN, h_BxGxRxPxN

  if initial_state is None:
    # From a zero state the first chunk's own state is the state after it: the scan starts
    # there. Decaying a known zero state instead left XLA constant-folding the zero gradient of
    # that product (seconds of compile time and an HLO dump on stderr for one-chunk sequences).
    zero_1xBxGxRxPxN = jnp.zeros_like(own_KxBxGxRxPxN[:1])
    final, entering = jax.lax.scan(across, own_KxBxGxRxPxN[0],
                                   (chunk_decay_KxBxGxR[1:], own_KxBxGxRxPxN[1:]))
    entering = jnp.concatenate([zero_1xBxGxRxPxN, entering])
  else:
    final, entering = jax.lax.scan(across, f32(initial_state).reshape(batch, G, R, P, N),
                                   (chunk_decay_KxBxGxR, own_KxBxGxRxPxN))
  entering_BxKxGxRxPxN = jnp.moveaxis(entering, 0, 1)

  # 4. State to output: y_l += exp(a_l) (h_entering C_l).
  y_off = einsum('bkgln,bkgrpn->bkgrlp', C_BxKxGxQxN, entering_BxKxGxRxPxN)
  y_BxKxGxRxQxP = y_BxKxGxRxQxP + y_off * jnp.exp(a_BxKxGxRxQ)[..., None]

  y = jnp.moveaxis(y_BxKxGxRxQxP, 4, 2).reshape(batch, nc * c, H, P)[:, :length]
  if return_final_state:
    return y.astype(x.dtype), final.reshape(batch, H, P, N)
  return y.astype(x.dtype)


def _chunk(a, pad: int, c: int):
  """(batch, L, ...) -> (batch, chunks, c, ...), the length padded with zeros."""
  a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
  return a.reshape(a.shape[0], -1, c, *a.shape[2:])


def ssd_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token of SSD's matrix products, which 6 x params does not count.

  With chunks of c = min(chunk_size, L) steps, per token and layer the forward pass does
  2 c G N (C_l . B_s within its chunk), 2 c H P (the decayed scores times Δ x), 2 H P N (its part
  of the chunk's state) and 2 H P N (reading the entering state): every product counted whole,
  as attention's causal scores are; x 3 for forward + backward. The recurrence over chunks
  (2 H P N per chunk) and the elementwise work (the decays' exp, the gate, the norm) are left
  out, as activation functions are elsewhere.
  """
  m = cfg.mamba2
  c = min(m.chunk_size, seq_len)
  H, P, G, N = cfg.mamba2_heads, m.head_dim, m.n_groups, m.d_state
  return 3.0 * (2 * c * G * N + 2 * c * H * P + 4 * H * P * N)


def _a_log_init(cfg: ModelConfig):
  """A = -exp(A_log) drawn uniform in -[a_init_min, a_init_max] per head (the paper's 1 to 16)."""
  m = cfg.mamba2

  def init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, dtype, m.a_init_min, m.a_init_max))
  return init


class DepthwiseConv(nn.Module):
  """Causal depthwise conv of width W over the length, for channels of any shape:
  y_t = sum_k w_k x_{t-W+1+k} + bias. Takes the W - 1 inputs before the first (zeros at a
  sequence's start, the conv state when decoding) and returns them for the next call too.
  PyTorch's Conv1d initialisation, as Mamba-2's."""
  config: ModelConfig
  axes: tuple[str, ...]  # logical axes of the channels

  @nn.compact
  def __call__(self, x_BxLx_, history_BxWm1x_):
    cfg = self.config
    W, channels = cfg.mamba2.d_conv, x_BxLx_.shape[2:]
    init = symmetric_uniform(1 / math.sqrt(W))  # fan-in of a depthwise conv is W
    kernel = self.param('kernel', param_init(init, ('conv',) + self.axes), (W, *channels),
                        jnp.float32).astype(x_BxLx_.dtype)
    L = x_BxLx_.shape[1]
    full = jnp.concatenate([history_BxWm1x_, x_BxLx_], axis=1)   # (B, W - 1 + L, ...)
    y = sum(kernel[k] * full[:, k:k + L] for k in range(W))
    if cfg.mamba2.conv_bias:
      bias = self.param('bias', param_init(init, self.axes), channels, jnp.float32)
      y = y + bias.astype(y.dtype)
    return y, full[:, L:]


class GatedRMSNorm(nn.Module):
  """RMSNorm(y ⊙ silu(z)) ⊙ scale, normalised over each group's heads (Mamba-2's norm_before_gate
  False, group size Din / G), in float32."""
  config: ModelConfig

  @nn.compact
  def __call__(self, y_BxLxHxP, z_BxLxHxP):
    cfg, m = self.config, self.config.mamba2
    batch, length, H, P = y_BxLxHxP.shape
    scale_HxP = self.param('scale', param_init(nn.initializers.ones, ('ssm_heads', 'ssm_head_dim')),
                           (H, P), jnp.float32)
    g = y_BxLxHxP.astype(jnp.float32) * jax.nn.silu(z_BxLxHxP.astype(jnp.float32))
    g = g.reshape(batch, length, m.n_groups, -1)
    g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + cfg.norm_eps)
    return g.reshape(batch, length, H, P) * scale_HxP


@register_mixer('mamba2', default_ffn='none', extra_flops_per_token=ssd_flops_per_token)
class Mamba2(Layer):
  """The Mamba-2 block (Dao & Gu 2024): in-projection, causal convolutions of x, B and C, the
  SSD scan over chunks (`ssd`), gated RMSNorm, out-projection; see the module's docstring."""

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL):
    del positions_BxL  # the recurrence itself orders the tokens
    cfg, m = self.config, self.config.mamba2
    H, P, G, N, W = cfg.mamba2_heads, m.head_dim, m.n_groups, m.d_state, m.d_conv
    batch = x_BxLxD.shape[0]
    dtype = compute_dtype(cfg)
    head_axes, group_axes = ('ssm_heads', 'ssm_head_dim'), ('ssm_groups', 'ssm_state')

    histories = dict(x=(H, P), B=(G, N), C=(G, N))
    if self.decode:  # state created at `init`, then carried from call to call
      initialised = self.has_variable('cache', 'ssm_state')
      conv_states = {k: self.variable('cache', f'conv_state_{k}', jnp.zeros, (batch, W - 1, *shape),
                                      dtype) for k, shape in histories.items()}
      ssm_state = self.variable('cache', 'ssm_state', jnp.zeros, (batch, H, P, N), jnp.float32)
      history = {k: v.value for k, v in conv_states.items()}
      h0_BxHxPxN = ssm_state.value
    else:
      history = {k: jnp.zeros((batch, W - 1, *shape), dtype) for k, shape in histories.items()}
      h0_BxHxPxN = None

    # The input projection, one kernel per output so each has its logical axes.
    z_BxLxHxP = dense(cfg, (H, P), ('embed',) + head_axes, 'in_z')(x_BxLxD)
    xs = dict(x=dense(cfg, (H, P), ('embed',) + head_axes, 'in_x')(x_BxLxD),
              B=dense(cfg, (G, N), ('embed',) + group_axes, 'in_B')(x_BxLxD),
              C=dense(cfg, (G, N), ('embed',) + group_axes, 'in_C')(x_BxLxD))
    dt_BxLxH = dense(cfg, H, ('embed', 'ssm_heads'), 'in_dt')(x_BxLxD)
    xs['x'] = nn.with_logical_constraint(xs['x'], ACT_BLHD)
    for k, axes in (('x', head_axes), ('B', group_axes), ('C', group_axes)):
      y, history[k] = DepthwiseConv(cfg, axes, name=f'conv_{k}')(xs[k], history[k])
      xs[k] = jax.nn.silu(y)

    dt_init = inverse_softplus_dt(m.dt_min, m.dt_max, m.dt_init_floor)
    dt_bias_H = self.param('dt_bias', param_init(dt_init, ('ssm_heads',)), (H,), jnp.float32)
    A_log_H = self.param('A_log', param_init(_a_log_init(cfg), ('ssm_heads',)), (H,),
                         jnp.float32)
    D_H = self.param('D', param_init(nn.initializers.ones, ('ssm_heads',)), (H,), jnp.float32)
    # Δ in float32: the small steps of slow heads keep their precision under bfloat16 compute.
    dt_BxLxH = jax.nn.softplus(dt_BxLxH.astype(jnp.float32) + dt_bias_H)
    x_BxLxHxP = xs['x'].astype(jnp.float32)
    y_BxLxHxP, last_BxHxPxN = ssd(x_BxLxHxP, dt_BxLxH, -jnp.exp(A_log_H), xs['B'], xs['C'],
                                  chunk_size=m.chunk_size, initial_state=h0_BxHxPxN,
                                  return_final_state=True)
    if self.decode and initialised:
      for k, v in conv_states.items():
        v.value = history[k]
      ssm_state.value = last_BxHxPxN
    y_BxLxHxP = y_BxLxHxP + x_BxLxHxP * D_H[:, None]
    y_BxLxHxP = GatedRMSNorm(cfg, name='norm')(y_BxLxHxP, z_BxLxHxP).astype(dtype)
    y_BxLxHxP = nn.with_logical_constraint(y_BxLxHxP, ACT_BLHD)
    return dense(cfg, cfg.d_model, head_axes + ('embed',), 'out', std=output_std(cfg),
                 in_axis=(-2, -1))(y_BxLxHxP)
