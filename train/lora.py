"""LoRA (Hu et al. 2021): train a low-rank update of chosen projections, the base frozen.

A target kernel W, whose axes split into inputs and outputs (`split_axes`), becomes

    W' = W + (alpha / r) * A @ B,     A: (*inputs, r) ~ N(0, 1 / fan_in),  B: (r, *outputs) = 0,

so a LoRA model starts equal to its base. Only {A, B} are parameters (trained, saved in
checkpoints); the base is frozen and read from the run the LoRA run starts from
(`train.init_from`), so it also serves as the reference model of DPO and RL without a second copy.
Everything here is a function of parameter trees: the model itself does not change, `merge`
gives it W' (costing one small matmul per kernel per step).

Which kernels: those whose name is in `lora.targets` (the attention's query, key, value and out,
the MLP's wi_gate, wi_up, wi and wo, Mamba's in_x, in_z and out by default) and whose logical
axes start or end with 'embed' (so the split into inputs and outputs is known); MoE experts and
embeddings are left alone. A scanned run's kernels have a leading 'layers' axis, and so do their
A and B.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from model.config import ConfigError

DEFAULT_TARGETS = ('query', 'key', 'value', 'out', 'wi_gate', 'wi_up', 'wi', 'wo', 'in_x', 'in_z')
RANK_AXIS = 'lora_rank'


def split_axes(names: tuple[str, ...]) -> tuple[int, int] | None:
  """(number of leading 'layers' axes, number of input axes) of a kernel with logical axis
  `names`, or None when its inputs and outputs cannot be told apart (not a projection of the
  residual stream). Inputs come first: ('embed', 'heads', 'kv') has 1, ('heads', 'kv', 'embed') 2."""
  layers = 1 if names and names[0] == 'layers' else 0
  rest = names[layers:]
  if 'exp' in rest or 'vocab' in rest or len(rest) < 2:
    return None
  if rest[0] == 'embed':
    return layers, 1
  if rest[-1] == 'embed':
    return layers, len(rest) - 1
  return None


def _targets(boxed_params, targets):
  """{path: (box, layers, inputs)} of the kernels LoRA adapts."""
  flat = traverse_util.flatten_dict(boxed_params, is_leaf=lambda _, x: isinstance(
      x, nn.Partitioned))
  out = {}
  for path, leaf in flat.items():
    if path[-1] != 'kernel' or len(path) < 2 or path[-2] not in targets:
      continue
    split = split_axes(tuple(leaf.names))
    if split is not None:
      out[path[:-1]] = (leaf, *split)
  return out


def init_adapters(boxed_params, rank: int, targets=DEFAULT_TARGETS, rng=None):
  """The adapters {path: {'lora_a', 'lora_b'}} of the base's boxed (logically named) parameters,
  boxed with logical names too (A: inputs + lora_rank, B: lora_rank + outputs). `boxed_params`
  may be abstract (jax.eval_shape), then so is the result's structure, with `rng` unused."""
  if rank < 1:
    raise ConfigError(f'lora.rank={rank} must be >= 1 (0 switches LoRA off)')
  found = _targets(boxed_params, set(targets))
  if not found:
    raise ConfigError(f'lora.targets={list(targets)} names no projection of this model; its '
                      f'kernels are named like query, key, value, out, wi_gate, wi_up, wo')
  rng = jax.random.key(0) if rng is None else rng
  adapters = {}
  for i, (path, (box, layers, inputs)) in enumerate(sorted(found.items())):
    shape, names = box.value.shape, tuple(box.names)
    in_dims = shape[layers:layers + inputs]
    a_shape = (*shape[:layers], *in_dims, rank)
    b_shape = (*shape[:layers], rank, *shape[layers + inputs:])
    std = 1.0 / math.sqrt(math.prod(in_dims))
    a = std * jax.random.normal(jax.random.fold_in(rng, i), a_shape, jnp.float32)
    adapters[path] = {
        'lora_a': nn.LogicallyPartitioned(a, (*names[:layers + inputs], RANK_AXIS)),
        'lora_b': nn.LogicallyPartitioned(jnp.zeros(b_shape, jnp.float32),
                                          (*names[:layers], RANK_AXIS, *names[layers + inputs:]))}
  return traverse_util.unflatten_dict(adapters)


def merge(base_params, adapters, rank: int, alpha: float):
  """The base parameters with each adapted kernel W replaced by W + (alpha / rank) A @ B."""
  flat = traverse_util.flatten_dict(base_params)
  scale = alpha / rank
  for path, ab in traverse_util.flatten_dict(adapters, is_leaf=lambda _, x: 'lora_a' in x).items():
    a, b = ab['lora_a'], ab['lora_b']
    kernel = flat[(*path, 'kernel')]
    layers = a.ndim + b.ndim - 2 - kernel.ndim  # the leading ('layers') axes A and B share
    a_in = 'abcdefgh'[:a.ndim - 1 - layers]
    b_out = 'ijklmnop'[:b.ndim - 1 - layers]
    lead = 'uvw'[:layers]
    delta = jnp.einsum(f'{lead}{a_in}r,{lead}r{b_out}->{lead}{a_in}{b_out}', a, b)
    flat[(*path, 'kernel')] = kernel + scale * delta.astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)
