"""Binary-operation tables of Power et al. 2022 as a TFDS dataset, generated in-process.

Every equation `a o b = c` of the table is one record {'a', 'b', 'c'} (element ids). A seeded
permutation of the whole table puts round(train_fraction * N) equations in the 'train' split and
the rest in 'validation'; the builder's config name carries (operation, prime, fraction, seed), so
each variant is prepared once, under TFDS's data directory, with no download.

Operations (`task.operation`), elements 0..n-1:
  add        a + b mod p
  sub        a - b mod p
  div        a / b mod p = a * b^(p-2) mod p, for b != 0 (Fermat's inverse)
  x2_xy_y2   a^2 + ab + b^2 mod p
  s5         composition of permutations of 5 objects, (a o b)(i) = a(b(i)); n = 120, no prime

A model reads the tokens `a b =` (the '=' token is id n) and predicts c at the last position.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import tensorflow_datasets as tfds

from model.config import ConfigError
from train.data import generated_records

MODULAR = ('add', 'sub', 'div', 'x2_xy_y2')
OPERATIONS = MODULAR + ('s5',)


def is_prime(n: int) -> bool:
  return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def permutations(k: int = 5) -> np.ndarray:
  """All permutations of k objects in lexicographic order, (k!, k): row i is element i of S_k."""
  return np.asarray(list(itertools.permutations(range(k))), dtype=np.int64)


def num_elements(operation: str, prime: int) -> int:
  return len(permutations()) if operation == 's5' else prime


def table(operation: str, prime: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(a, b, c) over every valid pair, in row-major order of (a, b): a o b = c."""
  check_task(operation, prime)
  n = num_elements(operation, prime)
  a, b = (x.ravel() for x in np.meshgrid(np.arange(n), np.arange(n), indexing='ij'))
  if operation == 'div':
    a, b = a[b != 0], b[b != 0]
  p = prime
  if operation == 'add':
    c = (a + b) % p
  elif operation == 'sub':
    c = (a - b) % p
  elif operation == 'div':
    inverse = np.asarray([pow(int(y), p - 2, p) for y in range(p)])
    c = a * inverse[b] % p
  elif operation == 'x2_xy_y2':
    c = (a * a + a * b + b * b) % p
  else:  # s5: compose the permutations, then look the result up in the element list
    perms = permutations()
    composed = np.take_along_axis(perms[a], perms[b], axis=1)      # (a o b)(i) = a(b(i))
    index = {tuple(row): i for i, row in enumerate(perms)}
    c = np.asarray([index[tuple(row)] for row in composed])
  return a, b, c.astype(np.int64)


def check_task(operation: str, prime: int, train_fraction: float | None = None) -> None:
  if operation not in OPERATIONS:
    raise ConfigError(f'task.operation={operation!r} is not known; choose one of '
                      f'{list(OPERATIONS)}')
  if operation in MODULAR and not (is_prime(prime) and prime > 2):
    raise ConfigError(f'task.prime={prime} is not an odd prime; modular arithmetic here needs '
                      f'one (e.g. 59, 97 or 113)')
  if train_fraction is not None and not 0.0 < train_fraction < 1.0:
    raise ConfigError(f'task.train_fraction must be in (0, 1), got {train_fraction}')


def split_indices(num: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices into the table of the train and validation equations: a seeded permutation, cut."""
  order = np.random.default_rng(seed).permutation(num)
  cut = int(round(train_fraction * num))
  return np.sort(order[:cut]), np.sort(order[cut:])


class ArithmeticConfig(tfds.core.BuilderConfig):
  def __init__(self, *, operation: str, prime: int, train_fraction: float, seed: int, **kwargs):
    check_task(operation, prime, train_fraction)
    prime_part = '' if operation == 's5' else f'_p{prime}'
    super().__init__(name=f'{operation}{prime_part}_train{train_fraction:g}_seed{seed}', **kwargs)
    self.operation, self.prime = operation, prime
    self.train_fraction, self.seed = train_fraction, seed


class ArithmeticTable(tfds.core.GeneratorBasedBuilder):
  """The equations of one binary-operation table, split by a seeded permutation."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    scalar = tfds.features.Scalar(np.int64)
    return tfds.core.DatasetInfo(
        builder=self, description='Equations a o b = c of a binary operation (Power et al. 2022).',
        disable_shuffling=True,  # records in table order: a split reads back as sorted indices
        features=tfds.features.FeaturesDict({'a': scalar, 'b': scalar, 'c': scalar}))

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    a, b, c = table(cfg.operation, cfg.prime)
    train, val = split_indices(len(a), cfg.train_fraction, cfg.seed)
    return {'train': self._generate_examples(a[train], b[train], c[train]),
            'validation': self._generate_examples(a[val], b[val], c[val])}

  def _generate_examples(self, a, b, c):
    for i in range(len(a)):
      yield i, {'a': a[i], 'b': b[i], 'c': c[i]}


@dataclasses.dataclass(frozen=True)
class Task:
  """The two splits as token arrays: inputs (N, 3) = `a b =`, targets (N, 1) = c."""
  train: dict[str, np.ndarray]
  validation: dict[str, np.ndarray]
  num_elements: int                # n; '=' is token n, so the vocabulary is n + 1

  @property
  def vocab_size(self) -> int:
    return self.num_elements + 1


def load(task_cfg) -> Task:
  """Prepares the configured table (once per config) and reads both splits back."""
  config = ArithmeticConfig(operation=task_cfg.operation, prime=task_cfg.prime,
                            train_fraction=task_cfg.train_fraction, seed=task_cfg.seed,
                            version=ArithmeticTable.VERSION)
  builder = ArithmeticTable(config=config, data_dir=task_cfg.tfds_data_dir or None,
                            file_format='array_record')
  n = num_elements(task_cfg.operation, task_cfg.prime)
  splits = {}
  for split, records in generated_records(builder).items():
    a, b, c = (np.asarray([r[k] for r in records], np.int32) for k in 'abc')
    splits[split] = {'inputs': np.stack([a, b, np.full_like(a, n)], axis=1),
                     'targets': c[:, None]}
  return Task(splits['train'], splits['validation'], n)
