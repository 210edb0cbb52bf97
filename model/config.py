"""The model's configuration: one frozen dataclass, validated when it is built.

Configs on disk are ml_collections `ConfigDict`s (experiments/configs/*.py); `ModelConfig.from_dict`
turns their `model` section into this dataclass. Every invalid combination fails here, before any
array is allocated, with a message that names the field and the fix.

Shape letters used across `model/`: B batch, L length, D model width, H query heads, K kv heads,
Dh head width, F feed-forward width, V vocabulary, E experts, N state size, Din SSM inner width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from model.errors import ConfigError
from model.registry import parse_pattern

POSITIONS = ('learned', 'sinusoidal', 'rope', 'alibi', 'none')
ROPE_SCALINGS = ('none', 'linear', 'ntk', 'yarn')  # model/positions.py
NORMS = ('rmsnorm', 'layernorm', 'none')
ACTIVATIONS = ('gelu', 'relu', 'swiglu')
DTYPES = ('float32', 'bfloat16')
ATTENTION_IMPLS = ('xla', 'cudnn', 'elementwise')
REMAT_POLICIES = ('none', 'full', 'dots')
SCAN_IMPLS = ('parallel', 'sequential')


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-Experts feed-forward (used by pattern entries `...:moe`)."""
  num_experts: int = 8
  top_k: int = 2                # experts per token: 1 is Switch, 2 is GShard/Mixtral
  # Rescale each token's top_k router probabilities to sum to 1 (GShard, Mixtral). False keeps
  # the probabilities themselves (Switch): with top_k 1 a renormalised weight is always 1, so the
  # router would learn from the auxiliary losses only.
  renormalize: bool = True
  num_shared_experts: int = 0   # experts every token uses (DeepSeekMoE)
  d_ff: int | None = None       # width of one expert; None: the model's d_ff
  capacity_factor: float = 1.25  # 0 means dropless (grouped matmuls, no capacity)
  aux_loss_weight: float = 0.01  # Switch load-balancing loss
  z_loss_weight: float = 0.001   # ST-MoE router z-loss


@dataclasses.dataclass(frozen=True)
class MambaConfig:
  """Mamba-1 selective state-space mixer (used by pattern entries `mamba...`)."""
  d_state: int = 16             # N
  expand: int = 2               # Din = expand * D
  d_conv: int = 4               # causal depthwise conv width
  dt_rank: int | None = None    # None: ceil(D / 16), as the paper
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  conv_bias: bool = True
  scan_impl: str = 'parallel'   # 'parallel' (associative scan) or 'sequential' (lax.scan)
  scan_chunk: int = 128         # parallel scan chunk length: bounds memory to B*chunk*Din*N


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
  """Mamba-2 SSD mixer (used by pattern entries `mamba2...`); defaults are the paper's."""
  d_state: int = 128            # N
  head_dim: int = 64            # P; H = expand * D / P heads
  expand: int = 2               # Din = expand * D
  n_groups: int = 1             # G groups of B and C, shared by H / G heads each
  d_conv: int = 4               # causal depthwise conv width (over x, B and C)
  chunk_size: int = 256         # SSD's chunk: quadratic within, recurrent across
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  a_init_min: float = 1.0       # A = -a, a drawn uniform in [a_init_min, a_init_max] per head
  a_init_max: float = 16.0
  conv_bias: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only language model: a block pattern plus the choices every block shares."""
  vocab_size: int = 256
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int | None = None  # None: num_heads (MHA); 1: MQA; between: GQA
  head_dim: int | None = None      # None: d_model // num_heads
  d_ff: int | None = None          # None: 4 * d_model
  pattern: str = 'attn*4'          # see model.registry.parse_pattern
  position: str = 'rope'
  rope_base: float = 10000.0
  # Stretching RoPE past the context it was trained at (model/positions.py: rope_frequencies):
  # none | linear (position interpolation) | ntk (NTK-aware base) | yarn, by rope_factor for a
  # model trained at rope_original_len tokens (YaRN's ramp reads it). Factor 1 is the identity.
  rope_scaling: str = 'none'
  rope_factor: float = 1.0
  rope_original_len: int = 0
  max_len: int = 1024              # size of the learned position table; longest context it serves
  norm: str = 'rmsnorm'
  norm_eps: float = 1e-5
  activation: str = 'swiglu'
  use_bias: bool = False
  tie_embeddings: bool = True
  qk_norm: bool = False
  dropout: float = 0.0             # on embeddings and on each block's residual branch
  dtype: str = 'float32'           # compute dtype; parameters are always float32
  attention_impl: str = 'xla'      # xla | cudnn (jax.nn.dot_product_attention) | elementwise
  attention_window: int = 0        # attend to at most this many latest tokens; 0: all of them
  init_std: float = 0.02
  scan_layers: bool = True         # nn.scan over runs of identical layers
  remat: str = 'none'              # rematerialisation policy per layer
  moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
  mamba: MambaConfig = dataclasses.field(default_factory=MambaConfig)
  mamba2: Mamba2Config = dataclasses.field(default_factory=Mamba2Config)

  def __post_init__(self):
    _validate(self)

  # Derived sizes, so no module recomputes them differently.
  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dh(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def ff_width(self) -> int:
    return self.d_ff or 4 * self.d_model

  @property
  def dt_rank(self) -> int:
    return self.mamba.dt_rank or math.ceil(self.d_model / 16)

  @property
  def mamba2_heads(self) -> int:
    return self.mamba2.expand * self.d_model // self.mamba2.head_dim

  @property
  def layers(self) -> tuple[tuple[str, str], ...]:
    """The pattern as one (mixer, feed-forward) pair per layer."""
    return parse_pattern(self.pattern)

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ModelConfig':
    """Builds from a ConfigDict's `model` section (or any mapping); unknown keys are errors."""
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
    sub = {'moe': MoEConfig, 'mamba': MambaConfig, 'mamba2': Mamba2Config}
    for key, sub_cls in sub.items():
      if key in d and not isinstance(d[key], sub_cls):
        d[key] = _build(sub_cls, d[key] or {}, prefix=f'model.{key}.')
    return _build(cls, d, prefix='model.')

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **changes) -> 'ModelConfig':
    return dataclasses.replace(self, **changes)


def _build(cls, d: Mapping[str, Any], prefix: str):
  d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ConfigError(f'unknown config key(s) {[prefix + k for k in unknown]}; '
                      f'valid keys are {sorted(prefix + n for n in names)}')
  return cls(**d)


def _require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def _choice(field: str, value: str, choices: tuple[str, ...]):
  _require(value in choices, f'model.{field}={value!r} is not known; choose one of {list(choices)}')


def _validate(c: ModelConfig):
  for field, choices in (('position', POSITIONS), ('rope_scaling', ROPE_SCALINGS), ('norm', NORMS),
                         ('activation', ACTIVATIONS),
                         ('dtype', DTYPES), ('attention_impl', ATTENTION_IMPLS),
                         ('remat', REMAT_POLICIES)):
    _choice(field, getattr(c, field), choices)
  _choice('mamba.scan_impl', c.mamba.scan_impl, SCAN_IMPLS)
  for field in ('vocab_size', 'd_model', 'num_heads', 'max_len'):
    _require(getattr(c, field) > 0, f'model.{field} must be positive, got {getattr(c, field)}')
  _require(0.0 <= c.dropout < 1.0, f'model.dropout must be in [0, 1), got {c.dropout}')
  _require(c.attention_window >= 0, f'model.attention_window must be >= 0 (0 attends to every '
           f'earlier token), got {c.attention_window}')
  if c.head_dim is None:
    _require(c.d_model % c.num_heads == 0,
             f'model.d_model={c.d_model} is not divisible by model.num_heads={c.num_heads}; '
             f'pick num_heads dividing d_model or set model.head_dim explicitly')
  _require(c.num_heads % c.kv_heads == 0,
           f'model.num_heads={c.num_heads} is not divisible by model.num_kv_heads={c.kv_heads}; '
           f'grouped-query attention needs a whole number of query heads per kv head')
  if c.position == 'rope':
    _require(c.dh % 2 == 0, f'model.position=rope needs an even head width, got head width {c.dh} '
             f'(d_model / num_heads or model.head_dim); change the head width or the position')
  _require(c.rope_scaling != 'none' or c.rope_factor == 1.0,
           f'model.rope_factor={c.rope_factor} does nothing with model.rope_scaling=none; choose '
           f'one of {list(ROPE_SCALINGS[1:])}')
  if c.rope_scaling != 'none':
    _require(c.position == 'rope', f'model.rope_scaling={c.rope_scaling!r} stretches RoPE, but '
             f'model.position={c.position!r}; set model.rope_scaling=none or use position=rope')
    _require(c.rope_factor >= 1.0, f'model.rope_factor must be >= 1 (the new context over the '
             f'original one), got {c.rope_factor}')
    _require(c.rope_scaling != 'yarn' or c.rope_original_len > 0,
             f'model.rope_scaling=yarn needs model.rope_original_len, the context the model was '
             f'trained at (its data.seq_len), got {c.rope_original_len}')
  layers = c.layers  # parses the pattern; unknown entries raise here
  moe = c.moe
  if any(ffn == 'moe' for _, ffn in layers):
    _require(moe.num_experts >= 1, f'model.moe.num_experts must be >= 1, got {moe.num_experts}')
    _require(1 <= moe.top_k <= moe.num_experts,
             f'model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts='
             f'{moe.num_experts}')
    _require(moe.capacity_factor >= 0, 'model.moe.capacity_factor must be >= 0 (0 is dropless)')
    _require(moe.num_shared_experts >= 0,
             f'model.moe.num_shared_experts must be >= 0, got {moe.num_shared_experts}')
    _require(moe.d_ff is None or moe.d_ff > 0,
             f'model.moe.d_ff must be positive (or None for model.d_ff), got {moe.d_ff}')
    for field in ('aux_loss_weight', 'z_loss_weight'):
      _require(getattr(moe, field) >= 0,
               f'model.moe.{field} must be >= 0 (0 switches the loss off), got '
               f'{getattr(moe, field)}')
  if any(mixer == 'mamba' for mixer, _ in layers):
    m = c.mamba
    _require(m.d_state > 0 and m.expand > 0 and m.d_conv > 0,
             'model.mamba.d_state, expand and d_conv must be positive')
    _require(0 < m.dt_min <= m.dt_max, f'need 0 < model.mamba.dt_min <= model.mamba.dt_max, '
             f'got {m.dt_min}, {m.dt_max}')
    _require(m.scan_chunk > 0, 'model.mamba.scan_chunk must be positive')
    _require(m.dt_rank is None or m.dt_rank > 0, f'model.mamba.dt_rank must be positive (or None '
             f'for ceil(d_model / 16)), got {m.dt_rank}')
    _require(m.dt_init_floor > 0, f'model.mamba.dt_init_floor must be positive, got '
             f'{m.dt_init_floor}')
  if any(mixer == 'mamba2' for mixer, _ in layers):
    _validate_mamba2(c)


def _validate_mamba2(c: ModelConfig):
  m = c.mamba2
  for field in ('d_state', 'head_dim', 'expand', 'n_groups', 'd_conv', 'chunk_size'):
    _require(getattr(m, field) > 0, f'model.mamba2.{field} must be positive, got '
             f'{getattr(m, field)}')
  d_inner = m.expand * c.d_model
  _require(d_inner % m.head_dim == 0,
           f'model.mamba2.expand * model.d_model = {d_inner} is not divisible by '
           f'model.mamba2.head_dim={m.head_dim}; pick a head width dividing the inner width')
  _require(c.mamba2_heads % m.n_groups == 0,
           f'model.mamba2.n_groups={m.n_groups} does not divide the {c.mamba2_heads} heads '
           f'(expand * d_model / head_dim)')
  _require(0 < m.dt_min <= m.dt_max, f'need 0 < model.mamba2.dt_min <= model.mamba2.dt_max, '
           f'got {m.dt_min}, {m.dt_max}')
  _require(m.dt_init_floor > 0, f'model.mamba2.dt_init_floor must be positive, got '
           f'{m.dt_init_floor}')
  _require(0 < m.a_init_min <= m.a_init_max, f'need 0 < model.mamba2.a_init_min <= '
           f'model.mamba2.a_init_max, got {m.a_init_min}, {m.a_init_max}')


def check_context(c: ModelConfig, length: int, what: str = 'the sequence length'):
  """Fails when `length` tokens do not fit the learned position table."""
  if c.position == 'learned' and length > c.max_len:
    raise ConfigError(f'{what} ({length}) is longer than the learned position table '
                      f'(model.max_len={c.max_len}); raise model.max_len or shorten the context')
