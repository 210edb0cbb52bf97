"""What every objective gives the training loop, and the machinery the example-based ones share.

The loop calls, in this order:
  check()                          the objective's own config checks (at start-up)
  data(workdir, start)             (tokenizer, train, validation, template), loaded from the work
                                   directory or built in memory; `start` is the run it starts
                                   from (train.init_from) or None
  save(workdir, data)              writes what `data` built (process 0, once every check passed)
  train_dataset(data, p, P)        a grain MapDataset of this process's rows of each batch
  loss_fn(model)                   loss_fn(params, batch, rng, frozen) -> (loss sum, aux), as
                                   train/step.py describes
  eval_batches / eval_spec / eval_fn / summarize
                                   the validation metrics: eval_fn(params, frozen, batch) ->
                                   {sum: value, 'weight': ...} over the batches, then summarize

`head` is the model's output ('logits', or 'scalar' for a reward model) and `reference` says
whether the loss reads the frozen starting parameters (DPO's reference model).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import grain
import numpy as np

from model.config import ConfigError
from train import data as data_lib


@dataclasses.dataclass
class Data:
  tokenizer: Any
  train: Any
  validation: Any
  template: Any = None   # the chat template (train.chat.ChatTemplate), for conversations
  built: bool = False    # made now (to be saved), rather than read from the work directory


class Objective:
  name: str = ''
  head: str = 'logits'
  reference: bool = False

  def __init__(self, config):
    self.config = config

  def check(self) -> None:
    if self.reference and not self.config.train.init_from:
      raise ConfigError(f'train.objective={self.name} needs train.init_from: its reference '
                        f'model is the run it starts from (e.g. --init_from=runs/sft)')

  def frozen_runs(self) -> dict[str, str]:
    """{config field: work directory} of the other runs whose parameters the objective reads
    besides train.init_from (PPO's reward model): the loop pins each to its latest step when the
    run begins (`<field>_step` in config.json), and that step is read ever after."""
    return {}

  def tokens_per_example(self) -> int:
    """Tokens one example of a batch holds, for the loop's tokens/s."""
    return self.config.data.seq_len

  # To be given by each objective.
  def data(self, workdir: str, start) -> Data:
    raise NotImplementedError

  def save(self, workdir: str, data: Data) -> None:
    raise NotImplementedError

  def train_dataset(self, data: Data, process_index: int, process_count: int
                    ) -> grain.MapDataset:
    raise NotImplementedError

  def loss_fn(self, model):
    raise NotImplementedError

  def eval_batches(self, data: Data, max_batches: int, process_index: int, process_count: int
                   ) -> Iterator[dict]:
    raise NotImplementedError

  def num_eval_batches(self, data: Data, max_batches: int) -> int:
    raise NotImplementedError

  def eval_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{name: (global shape, dtype)} of an evaluation batch, to compile ahead."""
    raise NotImplementedError

  def eval_fn(self, model):
    raise NotImplementedError

  def summarize(self, sums: dict, data: Data) -> dict:
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Objectives whose data is a list of examples of fixed size (conversations, pairs).


class Examples:
  """Examples as stacked arrays {name: (N, ...)}; random access to one example's rows."""

  def __init__(self, arrays: dict[str, np.ndarray], records: list[dict] | None = None):
    self.arrays = arrays
    self.records = records or []  # what each example came from (its JSON fields)
    sizes = {len(a) for a in arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f'example arrays of different lengths {sorted(sizes)}')
    self.num = sizes.pop()

  def __len__(self) -> int:
    return self.num

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: a[int(i)] for k, a in self.arrays.items()}


def example_dataset(examples: Examples, batch_size: int, seed: int, process_index: int,
                    process_count: int) -> grain.MapDataset:
  """Infinite batches of examples, with 'valid' ones: this process's rows
  (`train.data.process_blocks`)."""
  return data_lib.process_blocks(examples, batch_size, seed, process_index,
                                 process_count).map(_with_valid)


def _with_valid(batch: dict) -> dict:
  first = next(iter(batch.values()))
  return dict(batch, valid=np.ones(len(first), np.float32))


def num_example_batches(examples: Examples, batch_size: int, max_batches: int) -> int:
  num = -(-len(examples) // batch_size)
  return num if max_batches < 0 else min(num, max_batches)


def example_eval_batches(examples: Examples, batch_size: int, max_batches: int,
                         process_index: int, process_count: int) -> Iterator[dict]:
  """The examples in order, in global batches of `batch_size` rows, this process's block of
  each; rows past the end repeat example 0 with 'valid' 0."""
  rows = batch_size // process_count
  for b in range(num_example_batches(examples, batch_size, max_batches)):
    start = b * batch_size + process_index * rows
    index = np.arange(start, start + rows)
    valid = index < len(examples)
    batch = {k: a[np.where(valid, index, 0)] for k, a in examples.arrays.items()}
    yield dict(batch, valid=valid.astype(np.float32))


def check_cut(split: str, num: int, cut: int, empty: int, length: int) -> None:
  """Says how many examples were cut to `length` tokens; refuses a split none of whose examples
  kept a trained token."""
  from train.data import DataError
  from train.progress import say
  if empty == num:
    raise DataError(f'every {split} example loses its trained tokens (the answer) when cut to '
                    f'data.seq_len + 1 = {length} tokens; raise data.seq_len')
  if cut:
    say(f'warning: {cut} of {num} {split} examples are longer than data.seq_len + 1 = {length} '
        f'tokens and were cut ({empty} of them lost every trained token)')


def pad(tokens: np.ndarray, weights: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray,
                                                                       bool]:
  """(tokens, weights) cut or padded with zeros to `length`, and whether they were cut."""
  cut = len(tokens) > length
  tokens, weights = tokens[:length], weights[:length]
  extra = length - len(tokens)
  return (np.pad(tokens, (0, extra)).astype(np.int32),
          np.pad(weights, (0, extra)).astype(np.float32), cut)
