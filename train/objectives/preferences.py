"""Preference pairs, shared by the reward model and DPO: the chosen and the rejected conversation
of each JSON-lines record (train/chat.py), each rendered in the chat template, padded (or cut) to
seq_len + 1 tokens, with the weights of the answer's tokens and the index of its last token.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from model.blocks import METRICS
from train import chat, step as step_lib
from train.objectives.base import (Data, Examples, Objective, check_cut, example_dataset,
                                   example_eval_batches, num_example_batches, pad)
from train.objectives.sft import conversation_data, save_conversation_setup
from train.progress import bar

SIDES = ('chosen', 'rejected')


def answer_only(template: chat.ChatTemplate, conversation: list[dict]) -> list[tuple[str, bool]]:
  """The pieces of a conversation with weight on its final answer only (earlier assistant turns
  belong to the prompt both sides share)."""
  pieces = template.pieces(conversation)
  return [(text, trained and i == len(pieces) - 1) for i, (text, trained) in enumerate(pieces)]


class PreferenceObjective(Objective):
  """Data, batches and evaluation plumbing of pairs; `pair_sums` is the objective's own."""

  def tokens_per_step(self) -> int:
    return 2 * super().tokens_per_step()  # a chosen and a rejected sequence each

  def data(self, workdir: str, start) -> Data:
    return conversation_data(self, workdir, start, chat.parse_preference)

  def encode(self, tokenizer, template, records, split: str) -> Examples:
    length = self.config.data.seq_len + 1
    arrays = {f'{side}_{k}': [] for side in SIDES for k in ('tokens', 'weights', 'last')}
    cut = empty = 0
    for record in bar(records, len(records), f'encoding the {split} pairs', unit='pair'):
      for side in SIDES:
        tokens, weights = chat.encode(tokenizer, answer_only(template, record[side]))
        # The inputs are the first seq_len tokens: the last real one is the answer's end.
        last = min(len(tokens), length - 1) - 1
        tokens, weights, was_cut = pad(tokens, weights, length)
        cut += was_cut
        empty += not weights[1:].any()
        arrays[f'{side}_tokens'].append(tokens)
        arrays[f'{side}_weights'].append(weights)
        arrays[f'{side}_last'].append(last)
    check_cut(f'{split} pair', 2 * len(records), cut, empty, length)
    return Examples({k: np.asarray(v) for k, v in arrays.items()}, records)

  def save(self, workdir: str, data: Data) -> None:
    save_conversation_setup(workdir, data)

  def train_dataset(self, data: Data, process_index: int, process_count: int):
    tc = self.config.train
    return example_dataset(data.train, tc.batch_size, tc.seed, process_index, process_count)

  def eval_batches(self, data: Data, max_batches: int, process_index: int, process_count: int):
    return example_eval_batches(data.validation, self.config.train.eval_batch_size,
                                max_batches, process_index, process_count)

  def num_eval_batches(self, data: Data, max_batches: int) -> int:
    return num_example_batches(data.validation, self.config.train.eval_batch_size, max_batches)

  def eval_spec(self):
    rows, length = self.config.train.eval_batch_size, self.config.data.seq_len + 1
    spec = {'valid': ((rows,), jnp.float32)}
    for side in SIDES:
      spec.update({f'{side}_tokens': ((rows, length), jnp.int32),
                   f'{side}_weights': ((rows, length), jnp.float32),
                   f'{side}_last': ((rows,), jnp.int32)})
    return spec


def both_sides(batch: dict) -> dict:
  """The chosen rows, then the rejected ones, as one batch of 2B rows: {'inputs', 'targets',
  'weights' (the answer's target tokens), 'last' (the answer's last input position)}."""
  tokens = jnp.concatenate([batch['chosen_tokens'], batch['rejected_tokens']])
  weights = jnp.concatenate([batch['chosen_weights'], batch['rejected_weights']])
  last = jnp.concatenate([batch['chosen_last'], batch['rejected_last']])
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': weights[:, 1:],
          'last': last}


def chosen_mean_nll(answer_log_probs_2B, rows: dict):
  """The chosen answers' mean negative log-likelihood per answer token (B,), from every row's
  summed answer log-probability (2B,): the NLL term of RPO (DPO) and of the reward model."""
  tokens = jnp.maximum(halves(jnp.sum(rows['weights'], axis=-1))[0], 1.0)
  return -halves(answer_log_probs_2B)[0] / tokens


def halves(x):
  """(chosen, rejected) halves of a (2B, ...) array."""
  half = x.shape[0] // 2
  return x[:half], x[half:]


def pair_loss(sums: dict, cols: dict, valid) -> tuple:
  """The step's (loss, aux) contract (train/step.py) for a batch of pairs: the objective's sums
  plus the model's auxiliary losses (MoE), weighted by the number of valid pairs."""
  pairs = jnp.sum(valid)
  sums['aux_loss'] = step_lib.aux_loss_sum(cols) * pairs
  return sums['loss'] + sums['aux_loss'], {'weight': pairs, 'sums': sums,
                                           'layers': cols.get(METRICS, {})}
