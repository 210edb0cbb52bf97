"""Parameter and FLOP counts, read off the model's abstract parameter tree (no arrays allocated).

Parameters are classified by their logical axes: 'vocab' or 'position' marks an embedding table
(token embedding, untied output head, learned positions), 'exp' marks an expert's weights, of which
a token uses top_k / num_experts.

Training FLOPs per token follow Kaplan et al. 2020 and PaLM (Chowdhery et al. 2022, App. B):
6 x (active non-embedding parameters + the output head's D x V) plus each mixer's term that
parameters do not capture (attention's 12 * T * H * Dh per layer).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.registry import MIXERS
from model.config import ModelConfig
from model.lm import LM

EMBEDDING_AXES = ('vocab', 'position')


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int
  embedding: int
  non_embedding: int          # Kaplan et al.'s N
  active_non_embedding: int   # what one token uses (MoE: top_k of num_experts experts)


def abstract_params(cfg: ModelConfig):
  """The parameter tree as ShapeDtypeStructs wrapped in flax's LogicallyPartitioned boxes."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: LM(cfg).init(jax.random.key(0), t), tokens)['params']


def _leaves_with_axes(boxed_params):
  is_box = lambda x: isinstance(x, nn.Partitioned)
  for leaf in jax.tree.leaves(boxed_params, is_leaf=is_box):
    if is_box(leaf):
      yield leaf.value.size, tuple(leaf.names)
    else:
      yield leaf.size, ()


@functools.lru_cache(maxsize=256)
def count_params(cfg: ModelConfig) -> ParamCounts:
  total = embedding = experts = 0
  for size, names in _leaves_with_axes(abstract_params(cfg)):
    total += size
    if any(n in EMBEDDING_AXES for n in names):
      embedding += size
    elif 'exp' in names:
      experts += size
  non_embedding = total - embedding
  active_fraction = cfg.moe.top_k / cfg.moe.num_experts
  active = non_embedding - experts + round(experts * active_fraction)
  return ParamCounts(total, embedding, non_embedding, active)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward), the numerator of MFU."""
  n = count_params(cfg).active_non_embedding
  flops = 6.0 * (n + cfg.d_model * cfg.vocab_size)
  for mixer, _ in cfg.layers:
    flops += MIXERS[mixer].extra_flops_per_token(cfg, seq_len)
  return flops
