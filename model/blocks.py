"""The stack of blocks a pattern describes (model/registry.py: the pattern and the layer kinds).

Every layer module is built as `Cls(config=..., decode=..., deterministic=..., name=...)`; mixers
are called as `mixer(x_BxLxD, positions_BxL)` and feed-forwards as `ffn(x_BxLxD)`, both returning
(B, L, D). With `decode=True` a layer keeps its state in the 'cache' collection (created at
`init` with the full cache length, then updated one call at a time).
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax

from model.config import ModelConfig
from model.layers import ACT_BLD, Norm
from model.registry import FFNS, MIXERS, Layer

# Collections that layers write besides 'params' and 'cache'.
AUX_LOSS = 'aux_loss'   # scalars summed into the training loss (e.g. MoE load balancing)
METRICS = 'metrics'     # per-layer diagnostics written to metrics.jsonl (e.g. expert shares)
# A recurrent layer's decoding state after each position of a multi-token decode call, written
# when the caller makes it mutable, position on the last axis: what lets speculative decoding
# (model/speculative.py) restore the state at any accepted length.
CACHE_STEPS = 'cache_steps'


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


class Stack(Layer):
  """The layers of the pattern. With `scan_layers`, each run of identical layers is one `nn.scan`
  whose parameters are stacked on a leading 'layers' axis; otherwise every layer is its own
  module `layer_i`. Both compute the same function (tests/test_blocks.py). With `last_only` it
  returns the last position alone, (B, 1, D); an unscanned final layer with a position-wise
  feed-forward then computes it for that position only."""
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
