"""Synthetic recall tasks as TFDS datasets generated in process: MQAR and selective copying.

Every example is one row of `seq_len + 1` tokens (a model reads the first seq_len and predicts the
next token at each position) and an `answer` mask over the same positions: 1 where the token is
an answer the model must produce, 0 elsewhere. The loss and the accuracy are taken on the answers
only (experiments/recall/objective.py).

  mqar            multi-query associative recall (Arora et al. 2023, "Zoology"): num_pairs
                  key-value pairs `k1 v1 k2 v2 ...`, then, at random pair-aligned slots of the
                  rest of the row (0 elsewhere), num_queries distinct keys each followed by its
                  value. Keys are tokens 1..K, values K+1..vocab-1 with K = (vocab - 1) // 2;
                  the answers are the queried keys' values.
  selective_copy  selective copying (Gu & Dao 2023): num_tokens content tokens scattered, in
                  order, at random positions of a region of noise tokens, then a separator, then
                  the content tokens again in the same order: those are the answers. Token 0 is
                  unused (padding), 1 the noise, 2 the separator, 3..vocab-1 the content.

The builder's config name carries every knob (task, vocabulary, length, pairs or tokens, queries,
split sizes, seed), so each variant is prepared once under TFDS's data directory. 'train' and
'test' are drawn from different seeds, and a test row that also occurs in train is dropped: the
test split is held out.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from model.config import ConfigError
from train.data import generated_records

TASKS = ('mqar', 'selective_copy')
NOISE, SEPARATOR, FIRST_CONTENT = 1, 2, 3   # selective copying's special tokens


def num_keys(vocab: int) -> int:
  """MQAR's keys are 1..K and values K+1..vocab-1."""
  return (vocab - 1) // 2


def check_task(task: str, vocab: int, seq_len: int, num_items: int, num_queries: int) -> None:
  """num_items: MQAR's pairs, or selective copying's tokens."""
  if task not in TASKS:
    raise ConfigError(f'task.name={task!r} is not known; choose one of {list(TASKS)}')
  if task == 'mqar':
    if not 0 < num_items <= num_keys(vocab) or num_items > vocab - 1 - num_keys(vocab):
      raise ConfigError(f'task.num_pairs={num_items} needs that many distinct keys and values; '
                        f'task.vocab={vocab} has {num_keys(vocab)} keys: raise task.vocab')
    if not 0 < num_queries <= num_items:
      raise ConfigError(f'task.num_queries={num_queries} must be in 1..task.num_pairs '
                        f'({num_items}): each query is a distinct key')
    if 2 * num_items + 2 * num_queries > seq_len + 1:
      raise ConfigError(f'{num_items} pairs and {num_queries} queries take '
                        f'{2 * num_items + 2 * num_queries} tokens, more than task.seq_len + 1 = '
                        f'{seq_len + 1}: raise task.seq_len')
  else:
    if not 0 < num_items or vocab <= FIRST_CONTENT:
      raise ConfigError(f'task.num_tokens={num_items} must be positive and task.vocab={vocab} '
                        f'above {FIRST_CONTENT}')
    if 2 * num_items + 1 > seq_len + 1:
      raise ConfigError(f'{num_items} tokens to copy need a row of at least {2 * num_items + 1} '
                        f'tokens (region, separator, copy); task.seq_len={seq_len} is too short')


def mqar_example(rng: np.random.Generator, vocab: int, seq_len: int, num_pairs: int,
                 num_queries: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, answer mask), each of length seq_len + 1."""
  k = num_keys(vocab)
  keys = rng.choice(np.arange(1, k + 1), num_pairs, replace=False)
  values = rng.choice(np.arange(k + 1, vocab), num_pairs, replace=False)
  tokens = np.zeros(seq_len + 1, np.int64)
  answer = np.zeros(seq_len + 1, np.int64)
  tokens[0:2 * num_pairs:2], tokens[1:2 * num_pairs:2] = keys, values
  # Queries sit in pair-aligned slots after the pairs, chosen at random: gaps of 0s between.
  slots = (seq_len + 1 - 2 * num_pairs) // 2
  where = 2 * num_pairs + 2 * np.sort(rng.choice(slots, num_queries, replace=False))
  asked = rng.choice(num_pairs, num_queries, replace=False)
  tokens[where], tokens[where + 1] = keys[asked], values[asked]
  answer[where + 1] = 1
  return tokens, answer


def selective_copy_example(rng: np.random.Generator, vocab: int, seq_len: int,
                           num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  region = seq_len - num_tokens  # + separator + copy = seq_len + 1 tokens
  content = rng.integers(FIRST_CONTENT, vocab, num_tokens)
  tokens = np.full(seq_len + 1, NOISE, np.int64)
  tokens[np.sort(rng.choice(region, num_tokens, replace=False))] = content
  tokens[region] = SEPARATOR
  tokens[region + 1:] = content
  answer = np.zeros(seq_len + 1, np.int64)
  answer[region + 1:] = 1
  return tokens, answer


def generate(task: str, vocab: int, seq_len: int, num_items: int, num_queries: int, num: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, answers), each (num, seq_len + 1)."""
  check_task(task, vocab, seq_len, num_items, num_queries)
  rng = np.random.default_rng(seed)
  rows = [mqar_example(rng, vocab, seq_len, num_items, num_queries) if task == 'mqar'
          else selective_copy_example(rng, vocab, seq_len, num_items) for _ in range(num)]
  return np.stack([t for t, _ in rows]), np.stack([a for _, a in rows])


class RecallConfig(tfds.core.BuilderConfig):
  def __init__(self, *, task: str, vocab: int, seq_len: int, num_items: int, num_queries: int,
               num_train: int, num_test: int, seed: int, **kwargs):
    check_task(task, vocab, seq_len, num_items, num_queries)
    queries = f'_q{num_queries}' if task == 'mqar' else ''
    super().__init__(name=f'{task}_v{vocab}_l{seq_len}_n{num_items}{queries}_train{num_train}'
                          f'_test{num_test}_seed{seed}', **kwargs)
    self.task, self.vocab, self.seq_len = task, vocab, seq_len
    self.num_items, self.num_queries = num_items, num_queries
    self.num_train, self.num_test, self.seed = num_train, num_test, seed


class RecallTask(tfds.core.GeneratorBasedBuilder):
  """Rows of one recall task: a train split and a held-out test split."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    row = tfds.features.Tensor(shape=(self.builder_config.seq_len + 1,), dtype=np.int64)
    return tfds.core.DatasetInfo(
        builder=self, description='Synthetic recall: MQAR (Arora et al. 2023) and selective '
                                  'copying (Gu & Dao 2023).',
        disable_shuffling=True, features=tfds.features.FeaturesDict({'tokens': row,
                                                                     'answer': row}))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    args = (c.task, c.vocab, c.seq_len, c.num_items, c.num_queries)
    train = generate(*args, c.num_train, c.seed)
    test = generate(*args, c.num_test, c.seed + 1)
    seen = {row.tobytes() for row in train[0]}
    fresh = np.asarray([row.tobytes() not in seen for row in test[0]], bool)
    return {'train': self._generate_examples(*train),
            'test': self._generate_examples(test[0][fresh], test[1][fresh])}

  def _generate_examples(self, tokens, answers):
    for i in range(len(tokens)):
      yield i, {'tokens': tokens[i], 'answer': answers[i]}


@dataclasses.dataclass(frozen=True)
class Task:
  """Both splits as arrays {'tokens', 'answer'}, each (N, seq_len + 1)."""
  train: dict[str, np.ndarray]
  test: dict[str, np.ndarray]
  vocab_size: int


def num_items(task_cfg) -> int:
  return task_cfg.num_pairs if task_cfg.name == 'mqar' else task_cfg.num_tokens


def load(task_cfg) -> Task:
  """Prepares the configured task (once per config) and reads both splits back."""
  config = RecallConfig(task=task_cfg.name, vocab=task_cfg.vocab, seq_len=task_cfg.seq_len,
                        num_items=num_items(task_cfg), num_queries=task_cfg.num_queries or
                        task_cfg.num_pairs, num_train=task_cfg.num_train,
                        num_test=task_cfg.num_test, seed=task_cfg.seed,
                        version=RecallTask.VERSION)
  builder = RecallTask(config=config, data_dir=task_cfg.tfds_data_dir or None,
                       file_format='array_record')
  splits = {split: {k: np.stack([r[k] for r in records]).astype(np.int32)
                    for k in ('tokens', 'answer')}
            for split, records in generated_records(builder).items()}
  return Task(splits['train'], splits['test'], task_cfg.vocab)
