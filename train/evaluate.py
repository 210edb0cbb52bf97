"""Validation metrics of a split: loss (nats per token), perplexity, bits per character and byte."""

from __future__ import annotations

import math

import jax

from train import data as data_lib
from train import mesh as mesh_lib
from train.progress import bar


def evaluate(eval_step, params, split: data_lib.Split, seq_len: int, batch_size: int, mesh,
             max_batches: int = -1) -> dict[str, float]:
  """Runs the compiled `eval_step(params, batch) -> (loss sum, tokens)` over the split (the first
  `max_batches` batches, or all of it when negative), in global batches of `batch_size` rows laid
  out on `mesh`: this process loads only its block of each batch's rows.

  Bits per character/byte scale the loss by the split's tokens per character/byte, so they
  compare across tokenizers."""
  mesh_lib.check_batch(batch_size, mesh, 'train.eval_batch_size')
  sharding = mesh_lib.batch_sharding(mesh)
  batches = data_lib.eval_batches(split.tokens, seq_len, batch_size, max_batches,
                                  *mesh_lib.process_batch_block(mesh))
  num_batches = data_lib.num_eval_batches(split.tokens, seq_len, batch_size, max_batches)
  total = count = 0.0
  for batch in bar(batches, num_batches, 'evaluating on the whole validation split')\
      if max_batches < 0 else batches:
    loss_sum, tokens = jax.device_get(eval_step(params, mesh_lib.put_batch(batch, sharding)))
    total += float(loss_sum)
    count += float(tokens)
  loss = total / count
  tokens_in_split = len(split.tokens)
  return {'val_loss': loss,
          'val_perplexity': math.exp(min(loss, 700.0)),
          'val_bits_per_char': loss * tokens_in_split / split.num_chars / math.log(2),
          'val_bits_per_byte': loss * tokens_in_split / split.num_bytes / math.log(2),
          'val_tokens': int(count)}
