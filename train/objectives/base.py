"""What every objective gives the training loop, and the machinery the example-based ones share.

The loop calls, in this order:
  check()                          the objective's own config checks (at start-up)
  data(workdir, start)             (tokenizer, train, validation, template), loaded from the work
                                   directory or built in memory; `start` is the run it starts
                                   from (train.init_from) or None
  prepare(run)                     once the run's model and data are built and its config
                                   recorded (the pinned steps), before its layout and state
                                   and before it writes anything: what the objective needs of
                                   the run, and the checks that need it (nothing by default)
  frozen_models()                  {name: (model, parameters)} of other runs the loss reads
                                   (distillation's teacher): held in the state's `frozen`
  save(workdir, data)              writes what `data` built (process 0, once every check passed)
  train_dataset(data, p, P)        a grain MapDataset of this process's rows of each batch
  loss_fn(model)                   loss_fn(params, batch, rng, frozen) -> (loss sum, aux), as
                                   train/step.py describes
  steps_per_call()                 optimizer steps of one compiled call
  batches(run, k, step)            the next call's k batches, stacked, and metrics of making them
                                   (default: read from the run's iterator)
  tokens_per_step()                tokens one optimizer step trains on, for tokens/s and MFU
  evaluate(run, max_batches)       the validation metrics; by default eval_fn(params, frozen,
                                   batch) -> {sum: value, 'weight': ...} compiled over the mesh,
                                   summed over eval_batches, then `summarize`d

`head` is the model's output ('logits', or 'scalar' for a reward model), `reference` says
whether the loss reads the frozen starting parameters (DPO's reference model, `frozen['start']`),
and
`batches_read_params` whether the batches are made from the current parameters (a rollout): the
loop then makes them after a call's update rather than while the device computes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import grain
import jax
import numpy as np

from model.config import ConfigError
from train import data as data_lib
from train.evaluate import compile_eval_step, evaluate, sharded_eval_step


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
  batches_read_params: bool = False

  def __init__(self, config):
    self.config = config
    self._eval_step = None  # compiled at the first evaluation

  def check(self) -> None:
    if self.reference and not self.config.train.init_from:
      raise ConfigError(f'train.objective={self.name} needs train.init_from: its reference '
                        f'model is the run it starts from (e.g. --init_from=runs/sft)')

  def frozen_runs(self) -> dict[str, str]:
    """{config field: work directory} of the other runs whose parameters the objective reads
    besides train.init_from (PPO's reward model): the loop pins each to its latest step when the
    run begins (`<field>_step` in config.json), and that step is read ever after."""
    return {}

  def prepare(self, run) -> None:
    """What the objective needs of the run (train.loop.Run: config, model, data, mesh), before
    the run builds its state and writes anything."""

  def frozen_models(self) -> dict[str, tuple[Any, Any]]:
    """{name: (model, parameters)}: other runs' models whose outputs the loss reads, loaded by
    `prepare` (distillation's teacher). The loop holds each in the train state's frozen
    parameters (`frozen[name]` in loss_fn), laid out on the run's mesh: never trained, never
    checkpointed."""
    return {}

  def steps_per_call(self) -> int:
    return self.config.train.steps_per_call

  def tokens_per_step(self) -> int:
    """Tokens the model reads in one optimizer step, for the loop's tokens/s and MFU."""
    return self.config.train.batch_size * self.config.data.seq_len

  def batches(self, run, k: int, step: int) -> tuple[dict, dict]:
    """The next `k` steps' batches, stacked {name: (k, B / processes, ...)} (numpy, this
    process's rows), and metrics of making them (none here): read from the run's iterator."""
    del step
    return run.iterator.next(k), {}

  def evaluate(self, run, max_batches: int) -> dict:
    """The validation metrics of the run's parameters on `max_batches` evaluation batches (all
    when negative): `eval_fn` compiled once over the run's mesh, summed over `eval_batches`."""
    params, frozen = run.state.params, run.state.frozen
    if self._eval_step is None:
      shardings = jax.tree.map(lambda x: x.sharding, (params, frozen))
      self._eval_step = compile_eval_step(
          sharded_eval_step(self, run.model, run.mesh, *shardings, run.layout), self.eval_spec(),
          run.mesh, params, frozen)
    return evaluate(self._eval_step, params, frozen, self, run.data, run.mesh, max_batches)

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
