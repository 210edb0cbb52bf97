"""Positional schemes: learned and sinusoidal tables (added to embeddings), RoPE (rotates queries
and keys), ALiBi (a per-head linear bias on attention scores), and none.

All are functions of explicit integer positions, so cached decoding passes the position of the
token it feeds and gets exactly what the full forward pass computes.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def sinusoidal(positions_BxL: jnp.ndarray, d: int) -> jnp.ndarray:
  """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same). (B, L, d)."""
  i = jnp.arange(0, d, 2, dtype=jnp.float32)
  inv_freq = 1.0 / (10000.0 ** (i / d))                                  # (d/2,)
  angles = positions_BxL[..., None].astype(jnp.float32) * inv_freq      # (B, L, d/2)
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)            # (B, L, d/2, 2)
  return pe.reshape(*positions_BxL.shape, -1)[..., :d]


def rope(x_BxLxHxDh: jnp.ndarray, positions_BxL: jnp.ndarray, base: float) -> jnp.ndarray:
  """Rotary embedding (Su et al. 2021), half-split layout: dims i and i + Dh/2 form one pair.

  Computed in float32 and cast back, so bfloat16 runs rotate exactly as float32 ones do.
  """
  dh = x_BxLxHxDh.shape[-1]
  inv_freq = 1.0 / (base ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))   # (Dh/2,)
  angles = positions_BxL[..., None].astype(jnp.float32) * inv_freq            # (B, L, Dh/2)
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x = x_BxLxHxDh.astype(jnp.float32)
  x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxDh.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """Press et al. 2022's head slopes: the geometric sequence starting at 2^(-8/n) for n a power of
  two; otherwise the slopes for the closest lower power of two, then every other slope of twice
  that many heads, as in the paper's reference code."""
  def power_of_two_slopes(n: int) -> list[float]:
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  if math.log2(num_heads).is_integer():
    slopes = power_of_two_slopes(num_heads)
  else:
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(closest)
    slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
  return np.asarray(slopes, dtype=np.float32)


def alibi_bias(q_pos_BxT: jnp.ndarray, k_pos_BxS: jnp.ndarray, num_heads: int) -> jnp.ndarray:
  """-slope_h * (q - k): zero on the diagonal, more negative the further back. (B, H, T, S)."""
  slopes = jnp.asarray(alibi_slopes(num_heads))
  distance = (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]).astype(jnp.float32)  # (B, T, S)
  return -slopes[None, :, None, None] * distance[:, None, :, :]
