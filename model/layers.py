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


def symmetric_uniform(bound: float):
  """Uniform in [-bound, bound]: with bound = fan_in^-1/2, PyTorch's default for a convolution or
  a linear layer, which the Mamba references keep."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def inverse_softplus_dt(dt_min: float, dt_max: float, floor: float):
  """A selective SSM's Δ bias (Mamba, Mamba-2): softplus^-1 of Δ drawn log-uniform in
  [dt_min, dt_max] and floored at `floor`, so that at initialisation (when Δ's projection of the
  input is still small) Δ spans the paper's range."""
  def init(key, shape, dtype=jnp.float32):
    log_dt = jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), floor)
    return dt + jnp.log(-jnp.expm1(-dt))
  return init


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


def projection_dot(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` of x (*R, *K) by kernel (*K, *N), which on CPU runs as one 2-D matmul,
  (prod(R), prod(K)) x (prod(K), prod(N)), reshaped back to (*R, *N).

  Why: the weight gradient of the (B, L, K) x (K, N) form contracts two axes of both operands,
  (B, L), and XLA's CPU compiler first copies each operand transposed, (K, B, L) and (N, B, L),
  to make those axes one; the 2-D form's gradient is a plain matmul. An MLP's gradient with these
  copies took 2.2x as long on CPU (BENCHMARKS.md, "projections as 2-D matmuls"). Other platforms
  keep the named axes: on a TPU the reshapes are not free (v5p, GPT-2 small, the 2-D form
  everywhere: 13.84 -> 14.51 GiB a chip, estimated step 41.8 -> 44.8 ms). The merged axes are
  batch and length, which no mesh rule shards apart. The LM head runs through it too."""
  (x_contract, k_contract), (x_batch, k_batch) = dimension_numbers
  num_k, rows = len(k_contract), x.ndim - len(k_contract)

  def general(x, kernel):
    return jax.lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)

  def matmul_2d(x, kernel):
    x_MxK = x.reshape(math.prod(x.shape[:rows]), -1)
    kernel_KxN = kernel.reshape(x_MxK.shape[1], -1)
    out_MxN = jnp.dot(x_MxK, kernel_KxN, precision=precision,
                      preferred_element_type=preferred_element_type)
    return out_MxN.reshape(x.shape[:rows] + kernel.shape[num_k:])

  if (x_batch or k_batch or tuple(k_contract) != tuple(range(num_k))
      or tuple(x_contract) != tuple(range(rows, x.ndim))):
    return general(x, kernel)
  return jax.lax.platform_dependent(x, kernel, cpu=matmul_2d, default=general)


def dense(cfg: ModelConfig, features: int | tuple[int, ...], axes: tuple[str, ...], name: str,
          std: float | None = None, in_axis: int | tuple[int, ...] = -1) -> nn.DenseGeneral:
  """A projection whose kernel carries `axes` (input axes first, then output axes), computed as
  one 2-D matmul on CPU (`projection_dot`).

  `std` defaults to the model's init_std; pass `output_std(cfg)` for residual-stream writers.
  """
  num_in = len(in_axis) if isinstance(in_axis, tuple) else 1
  return nn.DenseGeneral(
      features, axis=in_axis, use_bias=cfg.use_bias, dtype=compute_dtype(cfg),
      param_dtype=jnp.float32, dot_general=projection_dot,
      kernel_init=param_init(normal(cfg.init_std if std is None else std), axes),
      bias_init=param_init(nn.initializers.zeros, axes[num_in:]), name=name)
