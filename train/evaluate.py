"""Validation metrics of a split: loss (nats per token), perplexity, bits per character and byte."""

from __future__ import annotations

import math

import jax

from train import data as data_lib


def evaluate(eval_step, params, split: data_lib.Split, seq_len: int, batch_size: int,
             max_batches: int = -1, put=lambda batch: batch,
             process_block: tuple[int, int] = (0, 1)) -> dict[str, float]:
  """Runs the jitted `eval_step(params, batch) -> (loss sum, tokens)` over the split (the first
  `max_batches` batches, or all of it when negative). This process loads block `process_block`
  = (index, count) of each batch's rows, and `put` places them on devices as a global batch.

  Bits per character/byte scale the loss by the split's tokens per character/byte, so they
  compare across tokenizers."""
  total = count = 0.0
  for batch in data_lib.eval_batches(split.tokens, seq_len, batch_size, max_batches,
                                     *process_block):
    loss_sum, tokens = jax.device_get(eval_step(params, put(batch)))
    total += float(loss_sum)
    count += float(tokens)
  loss = total / count
  tokens_in_split = len(split.tokens)
  return {'val_loss': loss,
          'val_perplexity': math.exp(min(loss, 700.0)),
          'val_bits_per_char': loss * tokens_in_split / split.num_chars / math.log(2),
          'val_bits_per_byte': loss * tokens_in_split / split.num_bytes / math.log(2),
          'val_tokens': int(count)}
