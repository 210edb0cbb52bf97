"""The recall objective: next-token cross-entropy on the answer positions only, and accuracy there.

It is SFT's objective (train/objectives/sft.py) with the task's rows in place of conversations:
the rows come with an answer mask that plays the part of SFT's per-token weights (the loss is
`step.make_loss_fn` over them), and the evaluation adds the share of answers predicted exactly.
The rows are built in memory from the TFDS task (tasks.py), so a run's work directory holds no
copy of the data. A config names it as
`train.objective='experiments.recall.objective:Recall'`.

The model never reads an answer: where a row's token is an answer, its input is BLANK (as in
Zoology, whose inputs hold 0 after each query key). Were the answers inputs, a model could answer
a later query by elimination (the values already given are not its answer), and an MQAR with every
pair queried once would be partly solvable without recall; with them blanked, the only way to an
answer is to look its key up among the pairs.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from model.config import ConfigError
from train import step as step_lib
from train.objectives.base import Data, Examples, example_dataset, example_eval_batches
from train.objectives.sft import SFT

from experiments.recall import tasks


BLANK = 0  # the input in place of an answer token (MQAR's gap token; unused by selective copying)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """What the loop asks of a tokenizer: the vocabulary's size (the task's tokens are ids)."""
  vocab_size: int


def examples(split: dict) -> Examples:
  return Examples({'tokens': split['tokens'], 'weights': split['answer'].astype('float32')})


def as_recall_batch(batch: dict) -> dict:
  """Rows (B, L+1) of tokens and answer weights -> inputs (B, L) with every answer BLANK,
  targets (B, L) and the targets' weights (0 off the answers and on padding rows)."""
  tokens, answers = batch['tokens'], batch['weights'] * batch['valid'][:, None]
  inputs = np.where(batch['weights'][:, :-1] > 0, BLANK, tokens[:, :-1]).astype(tokens.dtype)
  return {'inputs': inputs, 'targets': tokens[:, 1:], 'weights': answers[:, 1:]}


def answer_metrics(logits_BxLxV, targets_BxL, weights_BxL) -> dict:
  """{'loss': summed cross-entropy on the answers, 'correct': answers whose most likely token is
  the target, 'weight': the number of answers}."""
  losses = step_lib.token_losses(logits_BxLxV, targets_BxL)
  hits = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
  return {'loss': jnp.sum(losses * weights_BxL), 'correct': jnp.sum(hits * weights_BxL),
          'weight': jnp.sum(weights_BxL)}


class Recall(SFT):
  name = 'recall'

  def check(self) -> None:
    super().check()
    t, dc = self.config.task, self.config.data
    if dc.seq_len != t.seq_len:
      raise ConfigError(f'data.seq_len={dc.seq_len} must equal task.seq_len={t.seq_len}: a row '
                        f'of the task is one training sequence')

  def data(self, workdir: str, start) -> Data:
    del workdir, start
    task = tasks.load(self.config.task)
    return Data(Vocabulary(task.vocab_size), examples(task.train), examples(task.test))

  def save(self, workdir: str, data: Data) -> None:
    del workdir, data  # rebuilt from the TFDS task on every start

  def train_dataset(self, data: Data, process_index: int, process_count: int):
    tc = self.config.train
    return example_dataset(data.train, tc.batch_size, tc.seed, process_index,
                           process_count).map(as_recall_batch)

  def eval_batches(self, data: Data, max_batches: int, process_index: int, process_count: int):
    batches = example_eval_batches(data.validation, self.config.train.eval_batch_size,
                                   max_batches, process_index, process_count)
    return map(as_recall_batch, batches)

  def eval_fn(self, model):
    def eval_fn(params, frozen, batch):
      del frozen
      logits = model.apply({'params': params}, batch['inputs'])
      return answer_metrics(logits, batch['targets'], step_lib.weights(batch))
    return eval_fn

  def summarize(self, sums: dict, data: Data) -> dict:
    return {'val_loss': sums['loss'] / sums['weight'],
            'val_accuracy': sums['correct'] / sums['weight'], 'val_answers': int(sums['weight'])}

