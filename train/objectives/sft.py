"""Supervised fine-tuning: next-token cross-entropy on demonstrations, on the assistant's tokens
only (the prompt and the chat markers carry weight 0).

`data.path` is a JSON-lines file or directory of demonstrations (train/chat.py), of which the last
`data.val_fraction` (after a seeded shuffle) is held out. Each conversation is rendered in the chat
template, one per row, padded (or cut) to seq_len + 1 tokens: rows never see each other, so no
example attends to another.
"""

from __future__ import annotations

import os

import numpy as np

from train import chat, step as step_lib, tokenizers
from train.data import DataError
from train.objectives.base import (Data, Examples, Objective, check_cut, example_dataset,
                                   example_eval_batches, num_example_batches, pad)
from train.objectives.lm import LanguageModeling
from train.progress import bar


def conversation_setup(config, workdir: str, start, records: list[dict]):
  """(tokenizer, chat template, whether they are new): the work directory's when a previous
  start saved them; else the start run's (a run speaks the format it was taught) with the
  config's template if it has none; else a tokenizer trained on the rendered conversations."""
  directory = os.path.join(workdir, 'tokenizer')
  if os.path.exists(os.path.join(directory, 'tokenizer.json')):
    return tokenizers.load(directory), chat.ChatTemplate.load(directory), False
  template = chat.ChatTemplate.from_config(config.chat)
  if start is not None:
    return start.tokenizer, start.template or template, True
  texts = [''.join(text for text, _ in template.pieces(m)) for r in records
           for m in conversations(r)]
  return tokenizers.train(config.data.tokenizer, texts, config.data.vocab_size), template, True


def conversations(record: dict) -> list[list[dict]]:
  """The conversations of a demonstration or a preference record."""
  if 'messages' in record:
    return [record['messages']]
  return [record['chosen'], record['rejected']]


def conversation_data(objective: Objective, workdir: str, start, parse,
                      tokenizer_texts=lambda record: record) -> Data:
  """Data of `config.data.path`'s JSON lines: each line parsed by `parse` (train/chat.py), a
  seeded split, the tokenizer and template (`conversation_setup`, which reads
  `tokenizer_texts(record)` for a new tokenizer), both splits through `objective.encode`."""
  config = objective.config
  records = chat.read_jsonl(config.data.path, parse)
  train, validation = split_examples(records, config.data.val_fraction, config.train.seed)
  tokenizer, template, new = conversation_setup(config, workdir, start,
                                                [tokenizer_texts(r) for r in train])
  return Data(tokenizer, objective.encode(tokenizer, template, train, 'train'),
              objective.encode(tokenizer, template, validation, 'validation'), template, new)


def save_conversation_setup(workdir: str, data: Data) -> None:
  directory = os.path.join(workdir, 'tokenizer')
  data.tokenizer.save(directory)
  data.template.save(directory)


def split_examples(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
  """(train, validation): a seeded shuffle, the last val_fraction held out (at least one)."""
  order = np.random.default_rng(seed).permutation(len(records))
  num_val = max(1, int(round(val_fraction * len(records))))
  if num_val >= len(records):
    raise DataError(f'{len(records)} examples cannot be split into training and validation; '
                    f'give more examples or a smaller data.val_fraction')
  return [records[i] for i in order[:-num_val]], [records[i] for i in order[-num_val:]]


class SFT(LanguageModeling):
  """The language-modelling loss and evaluation on conversations, weighted to the assistant's
  tokens; LanguageModeling's evaluation batches and step."""
  name = 'sft'

  def data(self, workdir: str, start) -> Data:
    return conversation_data(self, workdir, start, chat.parse_demonstration)

  def encode(self, tokenizer, template, records, split: str) -> Examples:
    length = self.config.data.seq_len + 1
    tokens, weights, cut, empty = [], [], 0, 0
    for record in bar(records, len(records), f'encoding the {split} conversations',
                      unit='example'):
      t, w = chat.encode(tokenizer, template.pieces(record['messages']))
      t, w, was_cut = pad(t, w, length)
      tokens.append(t)
      weights.append(w)
      cut += was_cut
      empty += not w[1:].any()
    check_cut(split, len(records), cut, empty, length)
    return Examples({'tokens': np.stack(tokens), 'weights': np.stack(weights)}, records)

  def save(self, workdir: str, data: Data) -> None:
    save_conversation_setup(workdir, data)

  def train_dataset(self, data: Data, process_index: int, process_count: int):
    tc = self.config.train
    return example_dataset(data.train, tc.batch_size, tc.seed, process_index,
                           process_count).map(as_lm_batch)

  def loss_fn(self, model):
    return step_lib.make_loss_fn(model, dropout=model.config.dropout > 0)

  def eval_batches(self, data: Data, max_batches: int, process_index: int, process_count: int):
    batches = example_eval_batches(data.validation, self.config.train.eval_batch_size,
                                   max_batches, process_index, process_count)
    return map(as_lm_batch, batches)

  def num_eval_batches(self, data: Data, max_batches: int) -> int:
    return num_example_batches(data.validation, self.config.train.eval_batch_size, max_batches)

  def summarize(self, sums: dict, data: Data) -> dict:
    return {'val_loss': sums['loss'] / sums['weight'], 'val_tokens': int(sums['weight'])}


def as_lm_batch(batch: dict) -> dict:
  """Rows of conversations -> inputs, targets and the targets' weights (0 on padding rows)."""
  tokens, weights = batch['tokens'], batch['weights'] * batch['valid'][:, None]
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': weights[:, 1:]}
