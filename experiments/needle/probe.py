"""The needle-in-a-haystack probe of any run trained on its format (haystack.py): accuracy at
each (depth, length), the answer's digits all predicted (greedy, teacher-forced: the same as
greedy decoding of the digits) after the question.

    grid_DxL = accuracy_grid(model, params, tokenizer, filler, lengths, depths, num=32)

Lengths past the run's training length are read whole, as eval/loss.py reads them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eval import loss as loss_lib
from experiments.needle import haystack


def answer_fn(model):
  """fn(params, inputs_BxL) -> greedy predictions of the last DIGITS positions, (B, DIGITS)."""
  def fn(params, inputs_BxL):
    logits_BxLxV = model.apply({'params': params}, inputs_BxL)
    return jnp.argmax(logits_BxLxV[:, -haystack.DIGITS:], axis=-1)
  return jax.jit(fn)


def probes(filler: str, length: int, depth: float, num: int, seed: int) -> list[haystack.Probe]:
  rng = np.random.default_rng([seed, length, int(round(depth * 1000))])
  return [haystack.make_probe(filler, length, depth, rng) for _ in range(num)]


def accuracy_grid(model, params, tokenizer, filler: str, lengths, depths, num: int = 32,
                  seed: int = 0) -> np.ndarray:
  """Accuracy (depths x lengths) over `num` probes per cell; NaN where the model cannot read
  the length (a learned position table)."""
  from model.config import ConfigError
  vocab = set(getattr(tokenizer, 'chars', '')) or None
  if vocab is not None:  # characters the run never saw cannot be encoded
    filler = ''.join(c for c in filler if c in vocab)
  fn = answer_fn(model)
  grid = np.full((len(depths), len(lengths)), np.nan)
  for j, length in enumerate(lengths):
    try:
      loss_lib.check_length(model.config, length - 1)
    except ConfigError:
      continue
    for i, depth in enumerate(depths):
      cell = probes(filler, length, depth, num, seed)
      tokens_BxL = np.stack([tokenizer.encode(p.prompt + p.answer) for p in cell])
      predicted = np.asarray(fn(params, tokens_BxL[:, :-1]))
      grid[i, j] = float(np.mean(np.all(predicted == tokens_BxL[:, -haystack.DIGITS:], axis=1)))
  return grid
