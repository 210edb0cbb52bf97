"""Mamba-1 (Gu & Dao 2023): the selective scan and the Mamba mixer built around it.

`selective_scan` is the recurrence, channels last, computed in float32:

    x_t = exp(Δ_t A) ⊙ x_{t-1} + Δ_t B_t u_t        state x_t: (Din, N) per sequence
    y_t = C_t · x_t + D u_t,  then y_t ⊙ silu(z_t)

with two implementations behind it: 'parallel' (`jax.lax.associative_scan` within chunks of the
length, a `lax.scan` carrying the state across chunks, each chunk recomputed on the backward pass
so memory stays bounded, and differentiated as the reverse-time recurrence) and 'sequential'
(`jax.lax.scan` over time steps, the reference).

The mixer (`mamba` in a block pattern): in_x and in_z projections, a causal depthwise conv on x,
SiLU, projections of x to Δ (rank R, then up to Din), B and C, the scan gated by silu(z), and the
output projection. In decode mode it keeps (conv state, SSM state) in the 'cache' collection, so
each new token costs O(1) work whatever the context length.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.blocks import CACHE_STEPS
from model.registry import Layer, register_mixer
from model.config import SCAN_IMPLS, ModelConfig
from model.layers import (compute_dtype, dense, inverse_softplus_dt, output_std, param_init,
                          symmetric_uniform)

# The inner width is split over devices like an MLP's hidden width: both map to 'tensor'.
ACT_BLDin = ('activation_batch', 'activation_length', 'activation_mlp')


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, impl: str = 'parallel', chunk: int = 128,
                   initial_state=None):
  """The selective scan of Mamba's reference implementation, channels last.

  u, delta, z: (batch, length, Din); A: (Din, N); B, C: (batch, length, N); D, delta_bias: (Din,).
  Δ = delta (+ delta_bias) (then softplus when `delta_softplus`). Returns y (batch, length, Din)
  in u's dtype, and with `return_last_state` also the last state (batch, Din, N) in float32.

  Keyword-only extras: `impl` ('parallel' or 'sequential'), `chunk` (the parallel scan's chunk
  length) and `initial_state` (batch, Din, N), the state before the first step (zeros if None),
  which lets decoding continue a sequence.
  """
  if impl not in SCAN_IMPLS:
    raise ValueError(f'selective_scan: impl={impl!r} is not known; choose one of {SCAN_IMPLS}')
  if chunk < 1:
    raise ValueError(f'selective_scan: chunk must be a positive number of steps, got {chunk}')
  batch, length, d_inner = u.shape
  n = A.shape[-1]
  expected = dict(delta=(batch, length, d_inner), A=(d_inner, n), B=(batch, length, n),
                  C=(batch, length, n), D=(d_inner,), z=(batch, length, d_inner),
                  delta_bias=(d_inner,), initial_state=(batch, d_inner, n))
  given = dict(delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
               initial_state=initial_state)
  for name, array in given.items():
    if array is not None and array.shape != expected[name]:
      raise ValueError(f'selective_scan: {name} has shape {array.shape}, expected '
                       f'{expected[name]} for u of shape {u.shape} and A of shape {A.shape}')

  f32 = lambda a: a.astype(jnp.float32)
  u_f, delta, A, B, C = map(f32, (u, delta, A, B, C))
  if delta_bias is not None:
    delta = delta + f32(delta_bias)
  if delta_softplus:
    delta = jax.nn.softplus(delta)
  h0 = (jnp.zeros((batch, d_inner, n), jnp.float32) if initial_state is None
        else f32(initial_state))
  if impl == 'parallel':
    y, last_state = _parallel_scan(u_f, delta, A, B, C, h0, chunk)
  else:
    y, last_state = _sequential_scan(u_f, delta, A, B, C, h0)
  if D is not None:
    y = y + u_f * f32(D)
  if z is not None:
    y = y * jax.nn.silu(f32(z))
  y = y.astype(u.dtype)
  return (y, last_state) if return_last_state else y


def _discretise(u_BxLxDin, delta_BxLxDin, A_DinxN, B_BxLxN):
  """exp(Δ A) and Δ B u for every step: (B, L, Din, N) each."""
  dA = jnp.exp(delta_BxLxDin[..., None] * A_DinxN)
  dBu = (delta_BxLxDin * u_BxLxDin)[..., None] * B_BxLxN[:, :, None, :]
  return dA, dBu


def _readout(h_BxLxDinxN, C_BxLxN):
  # Elementwise product and sum rather than an einsum: accelerators may run float32 contractions
  # at reduced precision by default, and the scan promises float32.
  return jnp.sum(h_BxLxDinxN * C_BxLxN[:, :, None, :], axis=-1)


def _sequential_scan(u, delta, A, B, C, h0_BxDinxN):
  """One `lax.scan` step per time step: the reference the parallel scan must equal."""
  def step(h_BxDinxN, inputs):
    u_BxDin, delta_BxDin, B_BxN, C_BxN = inputs
    dA, dBu = _discretise(u_BxDin[:, None], delta_BxDin[:, None], A, B_BxN[:, None])
    h_BxDinxN = dA[:, 0] * h_BxDinxN + dBu[:, 0]
    return h_BxDinxN, _readout(h_BxDinxN[:, None], C_BxN[:, None])[:, 0]

  time_major = lambda a: jnp.swapaxes(a, 0, 1)
  last, y_LxBxDin = jax.lax.scan(step, h0_BxDinxN, tuple(map(time_major, (u, delta, B, C))))
  return time_major(y_LxBxDin), last


def scan_states(u, delta, A, B, h0_BxDinxN, delta_bias=None, delta_softplus=False):
  """The state after every step, (batch, length, Din, N) in float32: the recurrence of
  `_sequential_scan`, whose one step is the same float32 arithmetic as a one-token decoding step
  (dA h + dBu), so the state kept for position t is the state one-token decoding holds there."""
  f32 = lambda a: a.astype(jnp.float32)
  u, delta, B = map(f32, (u, delta, B))
  if delta_bias is not None:
    delta = delta + f32(delta_bias)
  if delta_softplus:
    delta = jax.nn.softplus(delta)
  dA, dBu = _discretise(u, delta, f32(A), B)

  def step(h_BxDinxN, inputs):
    dA_BxDinxN, dBu_BxDinxN = inputs
    h_BxDinxN = dA_BxDinxN * h_BxDinxN + dBu_BxDinxN
    return h_BxDinxN, h_BxDinxN

  time_major = lambda a: jnp.swapaxes(a, 0, 1)
  _, h_LxBxDinxN = jax.lax.scan(step, f32(h0_BxDinxN), (time_major(dA), time_major(dBu)))
  return time_major(h_LxBxDinxN)


def _combine(earlier, later):
  """Composition of two steps h -> a h + b (first `earlier`, then `later`)."""
  a1, b1 = earlier
  a2, b2 = later
  return a1 * a2, a2 * b1 + b2


@jax.custom_vjp
def _linear_recurrence(a, b):
  """h_t = a_t h_{t-1} + b_t along axis 1 from h_{-1} = 0, by `jax.lax.associative_scan`.

  Its gradient is the same kind of recurrence run backwards, g_b_t = g_h_t + a_{t+1} g_b_{t+1}
  and g_a_t = g_b_t h_{t-1}: one more associative scan, 2.5 times faster on a CPU (measured on
  one chunk of 32 steps) than differentiating through the scan's slicing and interleaving."""
  return jax.lax.associative_scan(_combine, (a, b), axis=1)[1]


def _linear_recurrence_fwd(a, b):
  h = _linear_recurrence(a, b)
  return h, (a, h)


def _linear_recurrence_bwd(residuals, g_h):
  a, h = residuals
  a_next = jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)
  g_b = jax.lax.associative_scan(_combine, (a_next, g_h), axis=1, reverse=True)[1]
  h_prev = jnp.concatenate([jnp.zeros_like(h[:, :1]), h[:, :-1]], axis=1)
  return g_b * h_prev, g_b


_linear_recurrence.defvjp(_linear_recurrence_fwd, _linear_recurrence_bwd)


def _parallel_scan(u, delta, A, B, C, h0_BxDinxN, chunk: int):
  """Associative scan within chunks of the length; the state crosses chunks in a `lax.scan`.

  Only one chunk's (B, chunk, Din, N) tensors exist at a time, and `jax.checkpoint` recomputes
  them on the backward pass instead of storing them for every chunk, as Mamba's fused kernel
  recomputes its states: memory is O(B * chunk * Din * N + (L / chunk) * B * Din * N).
  """
  batch, length, _ = u.shape
  c = min(chunk, length)
  pad = -length % c
  # Padded steps have Δ = 0: exp(0 A) = 1 and Δ B u = 0 leave the state unchanged.
  padded = [jnp.pad(a, ((0, 0), (0, pad), (0, 0))) for a in (u, delta, B, C)]
  chunks = [jnp.swapaxes(a.reshape(batch, -1, c, a.shape[-1]), 0, 1) for a in padded]

  @jax.checkpoint
  def chunk_step(h_BxDinxN, inputs):
    u_Bxcxdin, delta_BxcxDin, B_BxcxN, C_BxcxN = inputs
    dA, dBu = _discretise(u_Bxcxdin, delta_BxcxDin, A, B_BxcxN)
    dBu = dBu.at[:, 0].add(dA[:, 0] * h_BxDinxN)  # the carried state enters at the first step
    h_BxcxDinxN = _linear_recurrence(dA, dBu)
    return h_BxcxDinxN[:, -1], _readout(h_BxcxDinxN, C_BxcxN)

  last, y = jax.lax.scan(chunk_step, h0_BxDinxN, tuple(chunks))
  y_BxLxDin = jnp.swapaxes(y, 0, 1).reshape(batch, length + pad, -1)[:, :length]
  return y_BxLxDin, last


def mamba_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token of the scan's elementwise work, which 6 x params does not count.

  Per token and state element (Din x N of them) the forward pass does 7 FLOPs: Δ A, its exp, the
  product with B (Δ u is per channel), the recurrence's multiply and add, and C · x's multiply
  and add; x 3 for forward + backward. A_log's Din x N parameters already put 6 per element into
  6 x params, so the extra term is 21 - 6 = 15 per element, independent of the length. Work on
  (Din,) vectors (softplus, D u, the gate) is left out, as activation functions are elsewhere.
  """
  del seq_len
  return 15.0 * cfg.mamba.expand * cfg.d_model * cfg.mamba.d_state


def _a_log_init(key, shape, dtype=jnp.float32):
  """A = -exp(A_log) = -[1, 2, ..., N] for every channel (S4D-Real)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=dtype)), shape)


class CausalConv(nn.Module):
  """Depthwise causal conv of width W over the length: y_t = sum_k w_k x_{t-W+1+k} (+ bias).

  Takes the W - 1 inputs before the first (zeros at a sequence's start, the conv state when
  decoding) and returns them for the next call too. PyTorch's Conv1d initialisation, as Mamba's.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxDin, history_BxWm1xDin):
    cfg = self.config
    W, Din = cfg.mamba.d_conv, x_BxLxDin.shape[-1]
    init = symmetric_uniform(1 / math.sqrt(W))  # fan-in of a depthwise conv is W
    kernel_WxDin = self.param('kernel', param_init(init, ('conv', 'ssm_inner')), (W, Din),
                              jnp.float32).astype(x_BxLxDin.dtype)
    L = x_BxLxDin.shape[1]
    full = jnp.concatenate([history_BxWm1xDin, x_BxLxDin], axis=1)   # (B, W - 1 + L, Din)
    y_BxLxDin = sum(kernel_WxDin[k] * full[:, k:k + L] for k in range(W))
    if cfg.mamba.conv_bias:
      bias = self.param('bias', param_init(init, ('ssm_inner',)), (Din,), jnp.float32)
      y_BxLxDin = y_BxLxDin + bias.astype(y_BxLxDin.dtype)
    return y_BxLxDin, full[:, L:]


class DeltaProjection(nn.Module):
  """Δ's up-projection (R -> Din). Its bias is returned, not added: the scan adds it in float32,
  where the small Δ of slow channels keep their precision under bfloat16 compute."""
  config: ModelConfig

  @nn.compact
  def __call__(self, dt_BxLxR):
    cfg, m = self.config, self.config.mamba
    R, Din = cfg.dt_rank, m.expand * cfg.d_model
    kernel_RxDin = self.param('kernel', param_init(symmetric_uniform(R ** -0.5),
                                                   ('ssm_rank', 'ssm_inner')), (R, Din),
                              jnp.float32)
    dt_init = inverse_softplus_dt(m.dt_min, m.dt_max, m.dt_init_floor)
    bias_Din = self.param('bias', param_init(dt_init, ('ssm_inner',)), (Din,), jnp.float32)
    return dt_BxLxR @ kernel_RxDin.astype(dt_BxLxR.dtype), bias_Din


@register_mixer('mamba', default_ffn='none', extra_flops_per_token=mamba_flops_per_token)
class Mamba(Layer):
  """The Mamba block (Gu & Dao 2023): in-projection to x and the gate z, a causal convolution of
  x, the selective scan with input-dependent Δ, B and C, the gate, out-projection."""

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL):
    del positions_BxL  # the recurrence itself orders the tokens
    cfg, m = self.config, self.config.mamba
    Din, N, W = m.expand * cfg.d_model, m.d_state, m.d_conv
    batch = x_BxLxD.shape[0]
    dtype = compute_dtype(cfg)

    if self.decode:  # state created at `init`, then carried from call to call
      initialised = self.has_variable('cache', 'ssm_state')
      conv_state = self.variable('cache', 'conv_state', jnp.zeros, (batch, W - 1, Din), dtype)
      ssm_state = self.variable('cache', 'ssm_state', jnp.zeros, (batch, Din, N), jnp.float32)
      history_BxWm1xDin, h0_BxDinxN = conv_state.value, ssm_state.value
    else:
      history_BxWm1xDin, h0_BxDinxN = jnp.zeros((batch, W - 1, Din), dtype), None

    x_BxLxDin = dense(cfg, Din, ('embed', 'ssm_inner'), 'in_x')(x_BxLxD)
    z_BxLxDin = dense(cfg, Din, ('embed', 'ssm_inner'), 'in_z')(x_BxLxD)
    x_BxLxDin = nn.with_logical_constraint(x_BxLxDin, ACT_BLDin)
    conv_in_BxLxDin, history_in_BxWm1xDin = x_BxLxDin, history_BxWm1xDin
    x_BxLxDin, history_BxWm1xDin = CausalConv(cfg, name='conv')(x_BxLxDin, history_BxWm1xDin)
    x_BxLxDin = jax.nn.silu(x_BxLxDin)

    dt_BxLxR = dense(cfg, cfg.dt_rank, ('ssm_inner', 'ssm_rank'), 'x_to_dt')(x_BxLxDin)
    B_BxLxN = dense(cfg, N, ('ssm_inner', 'ssm_state'), 'x_to_B')(x_BxLxDin)
    C_BxLxN = dense(cfg, N, ('ssm_inner', 'ssm_state'), 'x_to_C')(x_BxLxDin)
    delta_BxLxDin, delta_bias_Din = DeltaProjection(cfg, name='dt_proj')(dt_BxLxR)
    A_log = self.param('A_log', param_init(_a_log_init, ('ssm_inner', 'ssm_state')), (Din, N),
                       jnp.float32)
    D = self.param('D', param_init(nn.initializers.ones, ('ssm_inner',)), (Din,), jnp.float32)

    y_BxLxDin, last_BxDinxN = selective_scan(
        x_BxLxDin, delta_BxLxDin, -jnp.exp(A_log), B_BxLxN, C_BxLxN, D, z=z_BxLxDin,
        delta_bias=delta_bias_Din, delta_softplus=True, return_last_state=True,
        impl=m.scan_impl, chunk=m.scan_chunk, initial_state=h0_BxDinxN)
    if self.decode and initialised:
      conv_state.value, ssm_state.value = history_BxWm1xDin, last_BxDinxN
      if self.is_mutable_collection(CACHE_STEPS):  # the state after each position, kept last
        L = x_BxLxD.shape[1]
        full = jnp.concatenate([history_in_BxWm1xDin, conv_in_BxLxDin], axis=1)
        conv_steps = jnp.stack([full[:, t + 1:t + W] for t in range(L)], axis=-1)
        ssm_steps = scan_states(x_BxLxDin, delta_BxLxDin, -jnp.exp(A_log), B_BxLxN,
                                h0_BxDinxN, delta_bias_Din, delta_softplus=True)
        self.put_variable(CACHE_STEPS, 'conv_state', conv_steps)
        self.put_variable(CACHE_STEPS, 'ssm_state', jnp.moveaxis(ssm_steps, 1, -1))
    y_BxLxDin = nn.with_logical_constraint(y_BxLxDin, ACT_BLDin)
    return dense(cfg, cfg.d_model, ('ssm_inner', 'embed'), 'out', std=output_std(cfg))(y_BxLxDin)
