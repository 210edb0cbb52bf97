"""The layer kinds and the block pattern that names them.

A pattern lists one (mixer, feed-forward) pair per layer:

    attn*4                      four attention layers, each with its default feed-forward (mlp)
    attn:mlp,attn:moe           dense then MoE feed-forward
    mamba,mamba,mamba,attn      Jamba-like hybrid (mamba's default feed-forward is none)
    (mamba*3,attn:moe)*2        groups repeat too

Layer modules register themselves by name (`@register_mixer('attn', default_ffn='mlp')`), so a new
mixer or feed-forward is one new file and one import in `model/__init__.py`; the stack
(model/blocks.py) never changes. This module imports no other part of the model, so the config
can parse its pattern without a circle.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import flax.linen as nn

from model.errors import ConfigError

# `ModelConfig` (model/config.py) appears in annotations only, which are not evaluated.


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


class Layer(nn.Module):
  """What every mixer and feed-forward is built with (model/blocks.py's `Block` passes them on):
  the model's config, whether the call decodes against a cache (`decode`: its state lives in the
  'cache' collection), and whether dropout is off. A mixer is called as
  `(x_BxLxD, positions_BxL) -> y_BxLxD`, a feed-forward as `x_BxLxD -> y_BxLxD`."""
  config: ModelConfig
  decode: bool = False
  deterministic: bool = True


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
