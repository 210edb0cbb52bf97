"""Small building blocks every layer shares: dtypes, initialisers with logical axes, norms.

Every parameter is created through `param_init` so it carries logical axis names; `train/mesh.py`
maps those names onto mesh axes with one table of rules. Activations get logical constraints with
the `ACT_*` names, which are no-ops until a mesh and rules are active.
"""

from __future__ import annotations

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


def dense(cfg: ModelConfig, features: int | tuple[int, ...], axes: tuple[str, ...], name: str,
          std: float | None = None, in_axis: int | tuple[int, ...] = -1) -> nn.DenseGeneral:
  """A projection whose kernel carries `axes` (input axes first, then output axes).

  `std` defaults to the model's init_std; pass `output_std(cfg)` for residual-stream writers.
  """
  num_in = len(in_axis) if isinstance(in_axis, tuple) else 1
  return nn.DenseGeneral(
      features, axis=in_axis, use_bias=cfg.use_bias, dtype=compute_dtype(cfg),
      param_dtype=jnp.float32,
      kernel_init=param_init(normal(cfg.init_std if std is None else std), axes),
      bias_init=param_init(nn.initializers.zeros, axes[num_in:]), name=name)
