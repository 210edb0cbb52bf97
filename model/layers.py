"""Small building blocks every layer shares: dtypes, initialisers with logical axes, norms.

Every parameter is created through `param_init` so it carries logical axis names; `train/mesh.py`
maps those names onto mesh axes with one table of rules. Activations get logical constraints with
the `ACT_*` names, which are no-ops until a mesh and rules are active.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig

# Logical names of activation axes (parameters use 'vocab', 'embed', 'heads', 'kv_heads', 'kv',
# 'mlp', 'exp', 'norm', 'position', 'layers' and the SSM's 'ssm_inner', 'ssm_state', ...).
ACT_BLD = ('activation_batch', 'activation_length', 'activation_embed')
ACT_BLV = ('activation_batch', 'activation_length', 'activation_vocab')
ACT_BLHD = ('activation_batch', 'activation_length', 'activation_heads', 'activation_kv')


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
  return jnp.dtype(cfg.dtype)


class LogicalAxes(nn.LogicallyPartitioned):
  """A parameter boxed with its logical axis names, for `train/mesh.py` to map onto the mesh.

  Unboxing never adds a sharding constraint: parameters are laid out by the train step's jit
  shardings. (Flax's box constrains when a mesh is set, and DenseGeneral unboxes its kernel while
  it is still flat, before reshaping it to the named rank: flax issue #3676.)"""

  def unbox(self, apply_constraint: bool = True):
    del apply_constraint
    return self.value


def param_init(init: nn.initializers.Initializer, axes: tuple[str | None, ...]):
  """An initialiser whose parameter carries logical axis names."""
  def boxed(*args, **kwargs):
    return LogicalAxes(init(*args, **kwargs), axes)
  return boxed


def normal(std: float):
  return nn.initializers.normal(stddev=std)


def output_std(cfg: ModelConfig) -> float:
  """GPT-2's scaled init for projections that write into the residual stream."""
  return cfg.init_std / (2 * cfg.num_layers) ** 0.5


class Identity(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x


class Norm(nn.Module):
  """RMSNorm or LayerNorm over the last axis (statistics in float32), or identity for 'none'."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    ones = param_init(nn.initializers.ones, ('norm',))
    kwargs = dict(epsilon=cfg.norm_eps, dtype=compute_dtype(cfg), param_dtype=jnp.float32,
                  scale_init=ones)
    if cfg.norm == 'rmsnorm':
      return nn.RMSNorm(**kwargs, name='rmsnorm')(x)
    if cfg.norm == 'layernorm':
      zeros = param_init(nn.initializers.zeros, ('norm',))
      return nn.LayerNorm(**kwargs, use_bias=cfg.use_bias, bias_init=zeros, name='layernorm')(x)
    return x


def head_rmsnorm(cfg: ModelConfig, name: str) -> nn.Module:
  """RMSNorm over the head width, used for QK-norm."""
  return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=compute_dtype(cfg), param_dtype=jnp.float32,
                    scale_init=param_init(nn.initializers.ones, ('kv',)), name=name)


def activation(name: str):
  return {'gelu': jax.nn.gelu, 'relu': jax.nn.relu, 'swiglu': jax.nn.silu}[name]


def matmul_2d(x, kernel, dimension_numbers, precision=None):
  """`lax.dot_general` of x (..., *K) by kernel (*K, *N) as one (M, K) x (K, N) matmul: every
  leading axis of x is merged into M, every contracted axis into K.

  Why: the weight gradient of the (B, L, K) x (K, N) form contracts two axes of both operands,
  (B, L), and XLA's CPU compiler first copies each operand transposed, (K, B, L) and (N, B, L),
  to make those axes one; the 2-D form's gradient is a plain (K, M) x (M, N) matmul. A
  gradient with these copies took 2.2x as long on CPU (BENCHMARKS.md, "Flattened projections").
  The merged axes are batch and length, which no mesh rule shards apart, and the reshapes are
  free in row-major layouts."""
  (x_contract, k_contract), (x_batch, k_batch) = dimension_numbers
  num_k = len(k_contract)
  if (x_batch or k_batch or tuple(k_contract) != tuple(range(num_k))
      or tuple(x_contract) != tuple(range(x.ndim - num_k, x.ndim))):
    return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision)
  lead, free = x.shape[:x.ndim - num_k], kernel.shape[num_k:]
  x_MxK = x.reshape(math.prod(lead), -1)
  kernel_KxN = kernel.reshape(x_MxK.shape[1], math.prod(free))
  return jnp.dot(x_MxK, kernel_KxN, precision=precision).reshape(lead + free)


def dense(cfg: ModelConfig, features: int | tuple[int, ...], axes: tuple[str, ...], name: str,
          std: float | None = None, in_axis: int | tuple[int, ...] = -1) -> nn.DenseGeneral:
  """A projection whose kernel carries `axes` (input axes first, then output axes), computed as
  one 2-D matmul (`matmul_2d`).

  `std` defaults to the model's init_std; pass `output_std(cfg)` for residual-stream writers.
  """
  num_in = len(in_axis) if isinstance(in_axis, tuple) else 1
  return nn.DenseGeneral(
      features, axis=in_axis, use_bias=cfg.use_bias, dtype=compute_dtype(cfg),
      param_dtype=jnp.float32, dot_general=matmul_2d,
      kernel_init=param_init(normal(cfg.init_std if std is None else std), axes),
      bias_init=param_init(nn.initializers.zeros, axes[num_in:]), name=name)
