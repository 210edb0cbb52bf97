"""Device speed: the measured peak matmul rate (the denominator of MFU) and MFU itself."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def device_description() -> str:
  d = jax.devices()[0]
  return f'{jax.device_count()} x {d.device_kind} ({d.platform})'


def timed(fn, *args, repeats: int = 5, warmup: int = 1, statistic=np.median) -> float:
  """`statistic` (the median) of fn(*args)'s wall times over `repeats`, after `warmup` calls,
  each synchronised on its result (`fn` may be a closure that threads donated state)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(statistic(times))


def measure_peak_flops(dtype: str = 'float32', n: int | None = None, repeats: int = 5) -> float:
  """FLOP/s of an n x n matmul in `dtype` on one device: the practical ceiling MFU is read
  against. n defaults to 2048 on CPU (large enough to saturate it) and 8192 elsewhere. The
  fastest repeat counts: a ceiling is what the device reached, not what a neighbour left it."""
  if n is None:
    n = 2048 if jax.devices()[0].platform == 'cpu' else 8192
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  return 2.0 * n ** 3 / timed(matmul, a, b, repeats=repeats, statistic=np.min)


def peak_flops_per_s(dtype: str = 'float32', override: float = 0.0) -> float:
  """The denominator of MFU for all devices: `override` (train.peak_flops) when it is set, else
  one device's measured matmul rate times the device count."""
  return override or measure_peak_flops(dtype) * jax.device_count()


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_per_s: float) -> float:
  return flops_per_token * tokens_per_s / peak_flops_per_s
