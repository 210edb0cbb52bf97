"""Mamba-2: the chunked SSD against the recurrence run one step at a time (float64, outputs and
gradients), a split sequence continued from its final state, and the mixer in a model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.mamba2 import ssd


def ssd_inputs(seed, b, L, H, P, G, N, dtype=jnp.float64):
  k = jax.random.split(jax.random.key(seed), 6)
  normal = lambda key, shape: jax.random.normal(key, shape, dtype)
  return dict(x=normal(k[0], (b, L, H, P)),
              dt=jax.nn.softplus(normal(k[1], (b, L, H)) - 1.0),       # positive steps
              A=-jnp.exp(normal(k[2], (H,))),                          # negative
              B=normal(k[3], (b, L, G, N)), C=normal(k[4], (b, L, G, N)),
              initial_state=normal(k[5], (b, H, P, N)))


def recurrence(x, dt, A, B, C, initial_state=None):
  """The issue's equations one time step at a time (`lax.scan`), head h reading group
  h // (H / G): h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t, y_t = h_t C_t."""
  batch, _, H, P = x.shape
  G, N = B.shape[-2:]
  group_of_head = jnp.arange(H) // (H // G)
  h0 = jnp.zeros((batch, H, P, N), x.dtype) if initial_state is None else initial_state

  def step(h_BxHxPxN, inputs):
    x_BxHxP, dt_BxH, B_BxGxN, C_BxGxN = inputs
    B_BxHxN, C_BxHxN = B_BxGxN[:, group_of_head], C_BxGxN[:, group_of_head]
    h_BxHxPxN = (jnp.exp(dt_BxH * A)[..., None, None] * h_BxHxPxN
                 + (dt_BxH[..., None] * x_BxHxP)[..., None] * B_BxHxN[:, :, None, :])
    return h_BxHxPxN, jnp.sum(h_BxHxPxN * C_BxHxN[:, :, None, :], axis=-1)

  time_major = lambda a: jnp.swapaxes(a, 0, 1)
  last, y = jax.lax.scan(step, h0, tuple(map(time_major, (x, dt, B, C))))
  return time_major(y), last


SHAPES = {  # (batch, L, H, P, G, N, chunk_size, with an initial state)
    '37 steps in chunks of 8, 2 groups of 2 heads, initial state': (2, 37, 4, 3, 2, 5, 8, True),
    'one whole chunk, 1 group of 2 heads': (1, 16, 2, 4, 1, 3, 16, False),
    '20 steps in chunks of 7, a group per head, initial state': (2, 20, 3, 2, 3, 4, 7, True),
    'a chunk longer than the sequence': (1, 5, 2, 2, 1, 2, 64, True),
}


@pytest.mark.parametrize('shape', SHAPES)
def test_ssd_equals_the_sequential_recurrence_with_gradients(shape):
  b, L, H, P, G, N, chunk, with_state = SHAPES[shape]
  with jax.enable_x64(True):
    inputs = ssd_inputs(0, b, L, H, P, G, N)
    if not with_state:
      inputs['initial_state'] = None
    ky, kh = jax.random.split(jax.random.key(1))
    gy = jax.random.normal(ky, (b, L, H, P), jnp.float64)
    gh = jax.random.normal(kh, (b, H, P, N), jnp.float64)

    def gradients_and_outputs(fn):  # one compile gives y, the final state and every gradient
      def loss(a):
        y, h = fn(**a)
        return jnp.sum(y * gy) + jnp.sum(h * gh), (y, h)
      return jax.jit(jax.grad(loss, has_aux=True))(inputs)

    chunked = lambda **a: ssd(**a, chunk_size=chunk, return_final_state=True)
    g, (y, h) = gradients_and_outputs(chunked)
    g_ref, (y_ref, h_ref) = gradients_and_outputs(recurrence)
  assert y.dtype == h.dtype == jnp.float64
  np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(h, h_ref, rtol=1e-10, atol=1e-10)
  for name in inputs:
    if inputs[name] is not None:
      np.testing.assert_allclose(g[name], g_ref[name], rtol=1e-9, atol=1e-9, err_msg=name)


def test_the_final_state_continues_a_split_sequence_and_compute_is_float32():
  a = ssd_inputs(2, 2, 30, 4, 2, 2, 3, jnp.float32)
  del a['initial_state']
  run = jax.jit(lambda a, h0: ssd(**a, chunk_size=8, initial_state=h0, return_final_state=True))
  cut = lambda lo, hi: {k: (v[:, lo:hi] if k != 'A' else v) for k, v in a.items()}
  y_all, h_all = run(a, None)
  y_head, h_head = run(cut(0, 13), None)     # 13 and 17: neither half a multiple of the chunk
  y_tail, h_tail = run(cut(13, 30), h_head)  # as a prefill followed by decoding continues
  np.testing.assert_allclose(jnp.concatenate([y_head, y_tail], 1), y_all, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_tail, h_all, rtol=1e-5, atol=1e-5)
  # One step at a time, as decoding runs it.
  h = h_head
  for t in range(13, 16):
    y_t, h = run(cut(t, t + 1), h)
    np.testing.assert_allclose(y_t[:, 0], y_all[:, t], rtol=1e-5, atol=1e-5)

  # bfloat16 inputs: the result comes back in bfloat16, but SSD ran in float32 (it equals the
  # float32 computation on the same rounded inputs up to the output's rounding).
  bf16 = {k: v.astype(jnp.bfloat16) for k, v in a.items()}
  y_bf16, h_bf16 = run(bf16, None)
  y_f32, h_f32 = run({k: v.astype(jnp.float32) for k, v in bf16.items()}, None)
  assert y_bf16.dtype == jnp.bfloat16 and h_bf16.dtype == jnp.float32
  np.testing.assert_allclose(y_bf16.astype(jnp.float32), y_f32, rtol=2 ** -8, atol=1e-6)
  np.testing.assert_allclose(h_bf16, h_f32, rtol=1e-6, atol=1e-6)


def test_bad_ssd_inputs_name_the_argument():
  a = ssd_inputs(0, 2, 10, 4, 2, 2, 3, jnp.float32)
  del a['initial_state']
  with pytest.raises(ValueError, match=r'B has shape \(2, 9, 2, 3\), expected \(2, 10, 2, 3\)'):
    ssd(**dict(a, B=a['B'][:, 1:]), chunk_size=4)
  with pytest.raises(ValueError, match='the 3 groups of B and C must divide the 4 heads'):
    ssd(**dict(a, B=jnp.zeros((2, 10, 3, 3)), C=jnp.zeros((2, 10, 3, 3))), chunk_size=4)
  with pytest.raises(ValueError, match='chunk_size must be a positive'):
    ssd(**a, chunk_size=0)
