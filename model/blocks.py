"""The block pattern: a registry of mixers and feed-forwards, the pattern parser, and the stack.

A pattern lists one (mixer, feed-forward) pair per layer:

    attn*4                      four attention layers, each with its default feed-forward (mlp)
    attn:mlp,attn:moe           dense then MoE feed-forward
    mamba,mamba,mamba,attn      Jamba-like hybrid (mamba's default feed-forward is none)
    (mamba*3,attn:moe)*2        groups repeat too

Layer modules register themselves by name (`@register_mixer('attn', default_ffn='mlp')`), so a new
mixer or feed-forward is one new file and one import in `model/__init__.py`; the stack never changes.

Every layer module is built as `Cls(config=..., decode=..., deterministic=..., name=...)`; mixers
are called as `mixer(x_BxLxD, positions_BxL)` and feed-forwards as `ffn(x_BxLxD)`, both returning
(B, L, D). With `decode=True` a layer keeps its state in the 'cache' collection (created at
`init` with the full cache length, then updated one call at a time).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import flax.linen as nn
import jax

from model.config import ConfigError, ModelConfig
from model.layers import ACT_BLD, Norm

# Collections that layers write besides 'params' and 'cache'.
AUX_LOSS = 'aux_loss'   # scalars summed into the training loss (e.g. MoE load balancing)
METRICS = 'metrics'     # per-layer diagnostics written to metrics.jsonl (e.g. expert shares)
# A recurrent layer's decoding state after each position of a multi-token decode call, written
# when the caller makes it mutable, position on the last axis: what lets speculative decoding
# (model/speculative.py) restore the state at any accepted length.
CACHE_STEPS = 'cache_steps'


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  module: type[nn.Module]
  default_ffn: str
  # Training FLOPs per token that 6 * params does not count (attention scores, scans); see counting.
  extra_flops_per_token: Callable[[ModelConfig, int], float]
  # Whether the module takes `last_only` and then returns the last position's output alone,
  # (B, 1, D), from every position's input: what the final layer of an answer-only model needs.
  last_only: bool = False


@dataclasses.dataclass(frozen=True)
class FfnSpec:
  module: type[nn.Module] | None  # None: no feed-forward
  # Whether each position's output depends on that position alone. A feed-forward that is not
  # (MoE with capacity: earlier tokens claim the experts' slots) must see every position even when
  # only the last one is read, or its output and its decoding state would differ.
  position_wise: bool


MIXERS: dict[str, MixerSpec] = {}
FFNS: dict[str, FfnSpec] = {'none': FfnSpec(None, position_wise=True)}


def register_mixer(name: str, *, default_ffn: str,
                   extra_flops_per_token: Callable[[ModelConfig, int], float] = lambda c, l: 0.0,
                   last_only: bool = False):
  def register(cls):
    MIXERS[name] = MixerSpec(cls, default_ffn, extra_flops_per_token, last_only)
    return cls
  return register


def register_ffn(name: str, *, position_wise: bool = True):
  def register(cls):
    FFNS[name] = FfnSpec(cls, position_wise)
    return cls
  return register


_TOKEN = re.compile(r'\s*(\(|\)|,|\*\s*\d+|[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z_][A-Za-z0-9_]*)?)')


def parse_pattern(pattern: str) -> tuple[tuple[str, str], ...]:
  """'mamba*2,attn:moe' -> (('mamba', 'none'), ('mamba', 'none'), ('attn', 'moe'))."""
  tokens, pos, text = [], 0, pattern.strip()
  while pos < len(text):
    m = _TOKEN.match(text, pos)
    if not m:
      raise ConfigError(f'model.pattern={pattern!r}: cannot parse at {text[pos:]!r}; write entries '
                        f'like "attn*4", "attn:mlp,attn:moe" or "(mamba*3,attn)*2"')
    tokens.append(m.group(1).replace(' ', ''))
    pos = m.end()

  def parse_seq(i):
    layers = []
    while True:
      if i < len(tokens) and tokens[i] == '(':
        group, i = parse_seq(i + 1)
        if i >= len(tokens) or tokens[i] != ')':
          raise ConfigError(f'model.pattern={pattern!r}: unbalanced parentheses')
        i += 1
      elif i < len(tokens) and (tokens[i][0].isalpha() or tokens[i][0] == '_'):
        group, i = [_entry(tokens[i], pattern)], i + 1
      else:
        raise ConfigError(f'model.pattern={pattern!r}: expected a layer name or "(" at token '
                          f'{tokens[i] if i < len(tokens) else "end"!r}')
      if i < len(tokens) and tokens[i].startswith('*'):
        count = int(tokens[i][1:])
        if count < 1:
          raise ConfigError(f'model.pattern={pattern!r}: repeat counts must be >= 1')
        group, i = group * count, i + 1
      layers += group
      if i < len(tokens) and tokens[i] == ',':
        i += 1
        continue
      return layers, i

  if not tokens:
    raise ConfigError('model.pattern is empty; give at least one layer, e.g. "attn*4"')
  layers, i = parse_seq(0)
  if i != len(tokens):
    raise ConfigError(f'model.pattern={pattern!r}: unexpected {tokens[i]!r}')
  return tuple(layers)


def _entry(token: str, pattern: str) -> tuple[str, str]:
  mixer, _, ffn = token.partition(':')
  if mixer not in MIXERS:
    raise ConfigError(f'model.pattern={pattern!r}: unknown mixer {mixer!r}; registered mixers are '
                      f'{sorted(MIXERS)}')
  ffn = ffn or MIXERS[mixer].default_ffn
  if ffn not in FFNS:
    raise ConfigError(f'model.pattern={pattern!r}: unknown feed-forward {ffn!r}; registered '
                      f'feed-forwards are {sorted(FFNS)}')
  return mixer, ffn


def runs(layers: tuple[tuple[str, str], ...]) -> list[tuple[int, tuple[str, str], int]]:
  """Consecutive identical layers as (first index, (mixer, ffn), count)."""
  out = []
  for i, layer in enumerate(layers):
    if out and out[-1][1] == layer:
      out[-1] = (out[-1][0], layer, out[-1][2] + 1)
    else:
      out.append((i, layer, 1))
  return out


class Block(nn.Module):
  """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x)) unless ffn is 'none'.

  Returns (x, None) so the same module is the body of `nn.scan`. With `last_only` it returns the
  last position alone, (B, 1, D): the final layer of a model whose caller reads only the last
  position (answer-only losses, sampling's prefill). Its mixer still reads every position, and a
  mixer that can (`MixerSpec.last_only`: attention's query and output projections) computes the
  last position's output alone; a feed-forward that is not position-wise
  (`FfnSpec.position_wise`) still sees every position, and then so does the mixer's output; a
  position-wise one runs on the last position only.
  """
  config: ModelConfig
  mixer: str
  ffn: str
  decode: bool = False
  deterministic: bool = True
  last_only: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL):
    cfg = self.config
    kw = dict(config=cfg, decode=self.decode, deterministic=self.deterministic)
    mixer, ffn = MIXERS[self.mixer], FFNS[self.ffn]
    last_only = self.last_only and ffn.position_wise  # from here on, the last position alone
    h = Norm(cfg, name='mixer_norm')(x_BxLxD)
    h = mixer.module(**kw, **(dict(last_only=True) if last_only and mixer.last_only else {}),
                     name='mixer')(h, positions_BxL)
    if last_only:
      x_BxLxD, h = x_BxLxD[:, -1:], h[:, -1:]
    x_BxLxD = x_BxLxD + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
    if ffn.module is not None:
      h = Norm(cfg, name='ffn_norm')(x_BxLxD)
      h = ffn.module(**kw, name='ffn')(h)
      x_BxLxD = x_BxLxD + nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
    if self.last_only:
      x_BxLxD = x_BxLxD[:, -1:]
    return nn.with_logical_constraint(x_BxLxD, ACT_BLD), None


_REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block on the backward pass
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_name(first: int, count: int) -> str:
  """Parameter-tree name of a layer (count 1) or of a scanned run of `count` layers."""
  return f'layer_{first}' if count == 1 else f'layers_{first}_to_{first + count - 1}'


def run_layers(name: str) -> range | None:
  """The layer indices a `run_name` names, range(first, first + count); None for other names."""
  match = re.fullmatch(r'layer_(\d+)|layers_(\d+)_to_(\d+)', name)
  if match is None:
    return None
  if match[1] is not None:
    return range(int(match[1]), int(match[1]) + 1)
  return range(int(match[2]), int(match[3]) + 1)


class Stack(nn.Module):
  """The layers of the pattern. With `scan_layers`, each run of identical layers is one `nn.scan`
  whose parameters are stacked on a leading 'layers' axis; otherwise every layer is its own
  module `layer_i`. Both compute the same function (tests/test_blocks.py). With `last_only` it
  returns the last position alone, (B, 1, D); an unscanned final layer with a position-wise
  feed-forward then computes it for that position only."""
  config: ModelConfig
  decode: bool = False
  deterministic: bool = True
  last_only: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL):
    cfg = self.config
    block = Block
    if cfg.remat != 'none':
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    for first, (mixer, ffn), count in runs(cfg.layers):
      kw = dict(config=cfg, mixer=mixer, ffn=ffn, decode=self.decode,
                deterministic=self.deterministic)
      if cfg.scan_layers and count > 1:
        scanned = nn.scan(block, variable_axes={True: 0},
                          split_rngs={'params': True, 'dropout': True},
                          in_axes=(nn.broadcast,), length=count,
                          metadata_params={nn.PARTITION_NAME: 'layers'})
        x_BxLxD, _ = scanned(**kw, name=run_name(first, count))(x_BxLxD, positions_BxL)
      else:
        for i in range(first, first + count):
          final = self.last_only and i == cfg.num_layers - 1
          x_BxLxD, _ = block(**kw, last_only=final, name=run_name(i, 1))(x_BxLxD, positions_BxL)
    if self.last_only:  # a scanned final run returns every position
      x_BxLxD = x_BxLxD[:, -1:]
    return x_BxLxD
