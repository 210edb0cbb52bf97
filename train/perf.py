"""Device speed: the peak matmul rate (the denominator of MFU) and MFU itself.

The peak must be the same at every start of a run, or MFU moves with a neighbour's load rather
than with the run's speed. Known accelerators read it from a table of their published dense
bfloat16 peaks; any other device measures a matmul once per machine and keeps the figure in
~/.cache/nexttoken/peak_flops.json (delete it to measure again; `train.peak_flops` overrides
both). A CPU's peak is never below its cores' formula (cores x clock x 2 FMA units x lanes x 2),
and a run that computes faster than its peak measures again and raises it (`raised_peak`), so
MFU cannot exceed 100% because the matmul was timed on a busy machine. Devices that share one processor (CPU devices simulated with
--xla_force_host_platform_device_count) share its peak: it is counted once per process, not once
per device.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import platform as platform_lib
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


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: float      # what the TPU compiler may lay a program out in
  peak_flops: float     # dense bf16 matmul, per chip
  hbm_bandwidth: float  # bytes/s


# Peak bf16 FLOP/s and HBM bandwidth: the published per-chip figures of the Cloud TPU system
# architecture pages (https://cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e). HBM: what
# libtpu 0.0.42's compiler reports as available when a program does not fit ("exceeds available
# HBM (15.75G)"), a little under the published 32 GiB (v4), 16 GiB (v5e), 95 GiB (v5p) and
# 32 GB (v6e). Keyed by JAX's device_kind.
GiB = 2 ** 30
CHIPS = {
    'TPU v4': Chip('v4', 31.25 * GiB, 275e12, 1200e9),
    'TPU v5 lite': Chip('v5e', 15.75 * GiB, 197e12, 819e9),
    'TPU v5': Chip('v5p', 95.74 * GiB, 459e12, 2765e9),
    'TPU v6 lite': Chip('v6e', 31.25 * GiB, 918e12, 1638e9),
}


# Dense bfloat16 matmul FLOP/s per chip, from the vendors' published figures (TPUs: CHIPS above;
# NVIDIA: the SXM parts' data sheets, without sparsity). Keyed by a part of JAX's device_kind; MFU
# is quoted against this peak whatever the compute dtype, as MaxText and PaLM quote it.
KNOWN_PEAKS = {
    **{kind: chip.peak_flops for kind, chip in CHIPS.items()},
    'TPU v5p': CHIPS['TPU v5'].peak_flops,  # v5p's device_kind is 'TPU v5'
    'H100': 989e12,
    'H200': 989e12,
    'A100': 312e12,
}


def known_peak(device_kind: str) -> float | None:
  """The table's peak for `device_kind` (the longest matching key), or None."""
  keys = [k for k in KNOWN_PEAKS if k.lower() in device_kind.lower()]
  return KNOWN_PEAKS[max(keys, key=len)] if keys else None


def cache_path() -> str:
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'nexttoken', 'peak_flops.json')


def _machine_key(device, dtype: str) -> str:
  """What a measured peak belongs to: this host, its processor and core count, the device kind
  and the dtype."""
  return '|'.join([platform_lib.node(), platform_lib.processor() or platform_lib.machine(),
                   f'{os.cpu_count()} cores', device.platform, device.device_kind, dtype])


def cached_measured_peak(device, dtype: str) -> tuple[float, str]:
  """One device's measured peak, measured on the first call on this machine and read from the
  cache after: (FLOP/s, where it came from)."""
  path, key = cache_path(), _machine_key(device, dtype)
  cache = _read_cache(path)
  if key in cache:
    return float(cache[key]), f'measured on this machine, cached in {path}'
  flops = store_measured_peak(device, dtype, measure_peak_flops(dtype, repeats=10))
  return flops, f'measured now, cached in {path}'


def _read_cache(path: str) -> dict:
  if os.path.exists(path):
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError):  # unreadable: measure again and rewrite it
      pass
  return {}


def store_measured_peak(device, dtype: str, flops: float) -> float:
  """Keeps the faster of `flops` and the cached figure for this machine (a ceiling is what the
  device reached); returns it. A read-only home keeps nothing."""
  path, key = cache_path(), _machine_key(device, dtype)
  cache = _read_cache(path)
  cache[key] = max(flops, float(cache.get(key, 0.0)))
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f'{path}.{os.getpid()}', 'w') as f:
      json.dump(cache, f, indent=1)
    os.replace(f'{path}.{os.getpid()}', path)
  except OSError:
    pass
  return cache[key]


# Float32 lanes of one vector instruction, by the widest extension /proc/cpuinfo lists. Every
# x86 core since Haswell and Zen issues two FMA instructions a cycle (2 FLOPs a lane each); XLA's
# CPU matmuls compute bfloat16 in float32 lanes, so the figure serves every dtype.
_LANES = (('avx512f', 16), ('avx2', 8), ('avx', 8), ('sse2', 4))
FMA_UNITS = 2


def cpu_formula_peak(cpuinfo: str = '/proc/cpuinfo') -> tuple[float, str] | None:
  """This process's CPU cores x their clock x FLOPs a cycle (FMA_UNITS x lanes x 2), read from
  `cpuinfo` (and cpufreq's maximum where the kernel gives one): (FLOP/s, how), or None where it
  cannot be read. The clock a virtual machine shows may be below its boost, so a matmul can beat
  this figure; it is a floor under the measured peak, never the ceiling alone (`peak`)."""
  try:
    with open(cpuinfo) as f:
      text = f.read()
  except OSError:
    return None
  mhz = [float(line.split(':')[1]) for line in text.splitlines()
         if line.startswith('cpu MHz') and ':' in line]
  for path in glob.glob('/sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq'):
    try:
      with open(path) as f:
        mhz.append(int(f.read()) / 1e3)  # kHz
    except (OSError, ValueError):
      pass
  flags = set(next((line.split(':', 1)[1].split() for line in text.splitlines()
                    if line.startswith('flags')), []))
  lanes = next((n for flag, n in _LANES if flag in flags), 0)
  if not mhz or not lanes:
    return None
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  per_cycle = FMA_UNITS * lanes * 2
  flops = cores * max(mhz) * 1e6 * per_cycle
  return flops, (f'{cores} cores x {max(mhz) / 1e3:.2f} GHz x {per_cycle} FLOP/cycle = '
                 f'{flops / 1e9:,.0f} GFLOP/s')


def peak(dtype: str = 'float32', override: float = 0.0, devices=None) -> tuple[float, str]:
  """(the denominator of MFU for all `devices` (JAX's), where it comes from): `override`
  (train.peak_flops) when set; else the table's peak per chip times the chips; else one device's
  measured peak (cached) times the devices, except on CPUs, whose devices share the processor of
  their process: one peak per process, the larger of the measured matmul and the cores' formula
  (`cpu_formula_peak`), so that a measurement taken on a busy machine cannot make MFU exceed
  what the hardware can do."""
  if override:
    return float(override), 'train.peak_flops'
  devices = jax.devices() if devices is None else devices
  first = devices[0]
  table = known_peak(first.device_kind)
  if table is not None:
    return table * len(devices), f'{first.device_kind}: published peak {table / 1e12:g} TFLOP/s'
  flops, source = cached_measured_peak(first, dtype)
  if first.platform != 'cpu':
    return flops * len(devices), source
  processes = len({getattr(d, 'process_index', 0) for d in devices})
  formula = cpu_formula_peak()
  if formula is not None and formula[0] > flops:
    return formula[0] * processes, (f'the cores\' formula, {formula[1]}, above the matmul '
                                    f'{source}: {flops / 1e9:,.0f} GFLOP/s')
  return flops * processes, source + (f' (the cores\' formula gives {formula[1]})'
                                      if formula is not None else '')


def raised_peak(peak_flops: float, achieved_flops: float, dtype: str,
                devices=None) -> tuple[float, str] | None:
  """When a run computes `achieved_flops` FLOP/s, above the `peak_flops` its MFU is read
  against, the peak was measured low (a busy machine): the matmul measured again (the cache
  keeps the faster figure) and the new peak, never below what was achieved, with a line saying
  so. None while the peak holds."""
  if achieved_flops <= peak_flops:
    return None
  devices = jax.devices() if devices is None else devices
  measured = store_measured_peak(devices[0], dtype, measure_peak_flops(dtype, repeats=10))
  processes = len({getattr(d, 'process_index', 0) for d in devices})
  new = max(measured * processes, achieved_flops)
  return new, (f'MFU peak raised {peak_flops / 1e9:,.0f} -> {new / 1e9:,.0f} GFLOP/s: the run '
               f'computed {achieved_flops / 1e9:,.0f} GFLOP/s, above it (measured again)')


def peak_flops_per_s(dtype: str = 'float32', override: float = 0.0) -> float:
  """The denominator of MFU for all devices (`peak`)."""
  return peak(dtype, override)[0]


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_per_s: float) -> float:
  return flops_per_token * tokens_per_s / peak_flops_per_s
