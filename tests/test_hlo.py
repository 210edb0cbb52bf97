"""Reading compiled programs (train/hlo.py): matmul FLOPs with loops counted, against FLOPs
written out by hand, on programs compiled for a TPU slice (v5e:2x2, libtpu) and for the CPU."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.conftest import needs_libtpu
from train import hlo

STEPS, ROWS, WIDTH = 5, 64, 128


@functools.cache
def v5e_mesh():
  from train.compile_for import topology_devices
  return jax.make_mesh((4,), ('x',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=topology_devices('v5e:2x2'))


def repeated_matmul(x, w):
  """STEPS matmuls of (ROWS, WIDTH) @ (WIDTH, WIDTH) in a scanned loop."""
  return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, length=STEPS)[0]


def tpu_stats(fn, *shapes_and_specs) -> hlo.ProgramStats:
  mesh = v5e_mesh()
  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec))
          for shape, spec in shapes_and_specs]
  return hlo.analyze(jax.jit(fn).lower(*args).compile().as_text())


@needs_libtpu
def test_a_scanned_matmul_counts_every_step_on_each_chip_of_a_tpu_slice():
  stats = tpu_stats(repeated_matmul, ((ROWS, WIDTH), P('x')), ((WIDTH, WIDTH), P()))
  # Rows split over 4 chips: each multiplies ROWS / 4 rows, STEPS times.
  assert stats.matmul_flops == STEPS * 2 * (ROWS // 4) * WIDTH * WIDTH
  assert stats.unknown_loops == 0


@needs_libtpu
def test_a_batched_contraction_written_as_a_tpu_convolution_counts_its_multiply_adds():
  # Attention's scores: (B, Q, H, D) x (B, K, H, D) -> (B, H, Q, K); batch split over 4 chips.
  B, Q, K, H, D = 8, 32, 48, 4, 16
  scores = lambda q, k: jnp.einsum('bqhd,bkhd->bhqk', q, k)
  stats = tpu_stats(scores, ((B, Q, H, D), P('x')), ((B, K, H, D), P('x')))
  assert stats.matmul_flops == 2 * (B // 4) * H * Q * K * D


def test_the_cpu_compilers_dot_instructions_count_the_same():
  x = jax.ShapeDtypeStruct((ROWS, WIDTH), jnp.float32)
  w = jax.ShapeDtypeStruct((WIDTH, WIDTH), jnp.float32)
  stats = hlo.analyze(jax.jit(repeated_matmul).lower(x, w).compile().as_text())
  assert stats.matmul_flops == STEPS * 2 * ROWS * WIDTH * WIDTH


@needs_libtpu
def test_a_loop_with_a_data_dependent_exit_is_counted_once_and_reported():
  def until_large(x, w):
    return jax.lax.while_loop(lambda c: jnp.max(c) < 100.0, lambda c: c @ w + 1.0, x)
  stats = tpu_stats(until_large, ((ROWS, WIDTH), P('x')), ((WIDTH, WIDTH), P()))
  assert stats.unknown_loops == 1
  assert stats.matmul_flops == 2 * (ROWS // 4) * WIDTH * WIDTH


def test_the_roofline_is_the_slower_of_compute_and_memory_for_each_instruction():
  stats = hlo.ProgramStats(0.0, 0.0, {}, 0, ops=[(2.0, 100.0, 1.0), (1.0, 1.0, 50.0)])
  # (runs, FLOPs, bytes) at 10 FLOP/s and 10 B/s: 2 x 10 s compute-bound, then 5 s memory-bound.
  assert stats.roofline_seconds(10.0, 10.0) == (25.0, 5.0)
