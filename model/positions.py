"""Positional schemes: learned and sinusoidal tables (added to embeddings), RoPE (rotates queries
and keys), ALiBi (a per-head linear bias on attention scores), and none.

All are functions of explicit integer positions, so cached decoding passes the position of the
token it feeds and gets exactly what the full forward pass computes.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from model.config import ROPE_SCALINGS


def sinusoidal(positions_BxL: jnp.ndarray, d: int) -> jnp.ndarray:
  """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same). (B, L, d)."""
  i = jnp.arange(0, d, 2, dtype=jnp.float32)
  inv_freq = 1.0 / (10000.0 ** (i / d))                                  # (d/2,)
  angles = positions_BxL[..., None].astype(jnp.float32) * inv_freq      # (B, L, d/2)
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)            # (B, L, d/2, 2)
  return pe.reshape(*positions_BxL.shape, -1)[..., :d]


YARN_ALPHA, YARN_BETA = 1.0, 32.0  # YaRN's ramp bounds in rotations per original context (LLaMA)


def rope_frequencies(dh: int, base: float, scaling: str = 'none', factor: float = 1.0,
                     original_len: int = 0) -> tuple[np.ndarray, float]:
  """RoPE's angular frequencies theta_i = base^(-2i/Dh), (Dh/2,), stretched `factor` times for a
  context `factor` x longer than the `original_len` a model was trained at, and the factor on q and
  k (so on the attention logits squared):

    none    theta_i; 1
    linear  theta_i / s: position interpolation (Chen et al. 2023), position m read as m / s; 1
    ntk     base' = base * s^(Dh / (Dh - 2)) ("NTK-aware", bloc97 2023): the highest frequency
            stays, the lowest is interpolated by s; 1
    yarn    (1 - g_i) theta_i / s + g_i theta_i with the ramp g_i = clip((r_i - alpha) /
            (beta - alpha), 0, 1) of r_i = original_len * theta_i / (2 pi), the rotations of
            dimension i over the original context (Peng et al. 2023, alpha 1, beta 32): dimensions
            that turn many times keep their frequency, those turning less than once are
            interpolated; and sqrt(1/t) = 0.1 ln(s) + 1 on q and k (the logits' temperature t).

  Float64 in numpy: the frequencies are constants of the program, not traced values."""
  i = np.arange(0, dh, 2, dtype=np.float64)
  if scaling == 'ntk':
    base = base * factor ** (dh / (dh - 2))
  theta = base ** (-i / dh)
  if scaling == 'linear':
    return theta / factor, 1.0
  if scaling == 'yarn':
    rotations = original_len * theta / (2 * math.pi)
    ramp = np.clip((rotations - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA), 0.0, 1.0)
    return (1.0 - ramp) * theta / factor + ramp * theta, 0.1 * math.log(factor) + 1.0
  if scaling not in ('none', 'ntk'):
    raise ValueError(f'rope scaling {scaling!r} is not one of {ROPE_SCALINGS}')
  return theta, 1.0


def rope(x_BxLxHxDh: jnp.ndarray, positions_BxL: jnp.ndarray, base: float,
         scaling: str = 'none', factor: float = 1.0, original_len: int = 0) -> jnp.ndarray:
  """Rotary embedding (Su et al. 2021), half-split layout: dims i and i + Dh/2 form one pair,
  rotated by position x frequency i (`rope_frequencies`, which also gives YaRN's scale).

  Computed in float32 and cast back, so bfloat16 runs rotate exactly as float32 ones do.
  """
  dh = x_BxLxHxDh.shape[-1]
  theta, scale = rope_frequencies(dh, base, scaling, factor, original_len)
  inv_freq = jnp.asarray(theta, jnp.float32)                                   # (Dh/2,)
  angles = positions_BxL[..., None].astype(jnp.float32) * inv_freq            # (B, L, Dh/2)
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x = x_BxLxHxDh.astype(jnp.float32)
  x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  if scale != 1.0:
    out = out * scale
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
