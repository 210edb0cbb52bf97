"""Loss by position: how well a model predicts token t from the t tokens before it, for t up to
any evaluation length, at the length it was trained at or beyond it.

    loss_L, weight_L = loss_by_position(model, params, tokens, seq_len=1024, batch_size=8)
    buckets(loss_L, weight_L, width=64)      # [{'start', 'end', 'loss'}, ...]
    mean_over_prefixes(loss_L, weight_L, (64, 128, 256))   # Press et al.'s loss at each length

The validation stream is cut into windows of `seq_len` + 1 tokens exactly as the ordinary
evaluation cuts it (train/data.py: eval_batches), so at the training length the positions'
average is the validation loss. Nothing is cropped: a window longer than the training context is
read whole, and a model whose positions cannot reach that far (a learned table) is refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig, check_context
from train import data as data_lib
from train import step as step_lib
from train.progress import bar


def per_position_fn(model):
  """fn(params, batch) -> (summed loss (L,), summed weight (L,)) over the batch's rows."""
  def fn(params, batch):
    logits_BxLxV = model.apply({'params': params}, batch['inputs'])
    losses_BxL = step_lib.token_losses(logits_BxLxV, batch['targets'])
    w_BxL = batch['weights']
    return jnp.sum(losses_BxL * w_BxL, axis=0), jnp.sum(w_BxL, axis=0)
  return jax.jit(fn)


def check_length(cfg: ModelConfig, seq_len: int) -> None:
  """A learned position table cannot be read past its end (model.config.check_context)."""
  check_context(cfg, seq_len, 'the evaluation length --seq_len')


def loss_by_position(model, params, tokens: np.ndarray, seq_len: int, batch_size: int,
                     max_batches: int = -1, label: str = '') -> tuple[np.ndarray, np.ndarray]:
  """(mean loss at each position (seq_len,), number of tokens each mean is over (seq_len,)) on
  the stream's (seq_len + 1)-token windows, the first `max_batches` batches (all when < 0)."""
  check_length(model.config, seq_len)
  fn = per_position_fn(model)
  loss_L = np.zeros(seq_len)
  weight_L = np.zeros(seq_len)
  batches = data_lib.eval_batches(tokens, seq_len, batch_size, max_batches)
  total = data_lib.num_eval_batches(tokens, seq_len, batch_size, max_batches)
  for batch in bar(batches, total, label or f'loss by position at length {seq_len}'):
    loss, weight = jax.device_get(fn(params, batch))
    loss_L += loss
    weight_L += weight
  return loss_L / np.maximum(weight_L, 1), weight_L


def buckets(loss_L: np.ndarray, weight_L: np.ndarray, width: int) -> list[dict]:
  """The positions in consecutive buckets of `width`: [start, end) and their mean loss."""
  out = []
  for start in range(0, len(loss_L), width):
    end = min(start + width, len(loss_L))
    w = weight_L[start:end]
    out.append({'start': start, 'end': end,
                'loss': float(np.sum(loss_L[start:end] * w) / max(np.sum(w), 1))})
  return out


def mean_over_prefixes(loss_L: np.ndarray, weight_L: np.ndarray, lengths) -> dict[int, float]:
  """{L: the mean loss over positions 0..L-1}: the loss of a model evaluated on windows of L
  tokens (Press et al. 2022's measure), which sees exactly the positions < L of longer ones."""
  return {int(n): float(np.sum(loss_L[:n] * weight_L[:n]) / max(np.sum(weight_L[:n]), 1))
          for n in lengths if n <= len(loss_L)}
