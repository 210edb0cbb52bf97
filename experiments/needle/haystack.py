"""Needle in a haystack (Kamradt 2023; the pass-key retrieval of Mohtashami & Jaggi 2023), made
small enough for a character-level model on a CPU, as a TFDS dataset generated in process.

A probe of `length` characters is filler text (tiny shakespeare) with the needle
' The pass key is #482. ' put at a `depth` between 0 (the start) and 1 (just before the question),
then the question '\\nThe pass key is #' and the answer, the key's digits:

    ...filler... The pass key is #482. ...filler...\\nThe pass key is #482
                 ^ depth x (filler length)                          ^ answer

A model answers when it finds the earlier sentence and copies the digits after it (an induction
head's job). Training documents are probes of exactly `doc_len` characters at uniform random
depths; a char tokenizer appends nothing between documents, so a run at data.seq_len = doc_len
reads one whole probe per window. Filler comes from the first 90% of the corpus for the 'train'
split and the last 10% for 'validation' and for `probe.py`'s evaluation.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from experiments.configs import base

# '#' never occurs in the filler: it marks the key, so a two-layer induction circuit (previous-
# token head, then a head matching the token before) can find it; in plain words every ' ' after
# 'is' would match, and a character model would need a longer prefix match.
NEEDLE = ' The pass key is #{key}. '
QUESTION = '\nThe pass key is #'
DIGITS = 3
VAL_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Probe:
  prompt: str    # filler with the needle, then the question
  answer: str    # the key's digits
  depth: float
  needle_at: int  # character offset of the needle in the prompt


def overhead() -> int:
  """Characters of a probe that are not filler."""
  return len(NEEDLE.format(key='0' * DIGITS)) + len(QUESTION) + DIGITS


def make_probe(filler: str, length: int, depth: float, rng: np.random.Generator) -> Probe:
  """A probe of exactly `length` characters: a random stretch of `filler` with the needle at
  `depth` of it, the question, and the answer (a random key of DIGITS digits)."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f'depth must be in [0, 1], got {depth}')
  n = length - overhead()
  if n < 0 or n > len(filler):
    raise ValueError(f'a probe of {length} characters needs {overhead()} to '
                     f'{overhead() + len(filler)}')
  key = ''.join(str(d) for d in rng.integers(0, 10, DIGITS))
  start = int(rng.integers(0, len(filler) - n + 1))
  hay = filler[start:start + n]
  at = int(round(depth * n))
  prompt = hay[:at] + NEEDLE.format(key=key) + hay[at:] + QUESTION
  return Probe(prompt, key, depth, at)


def filler_text(path: str, split: str) -> str:
  """The corpus's characters of a split ('train': the first 90%, else the rest), digits and '#'
  removed so that only the key is a number and only the needle and question hold a '#'."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  cut = int(len(text) * (1.0 - VAL_FRACTION))
  text = text[:cut] if split == 'train' else text[cut:]
  return ''.join(c for c in text if not c.isdigit() and c != '#')


class HaystackConfig(tfds.core.BuilderConfig):
  def __init__(self, *, doc_len: int, num_train: int, num_validation: int, seed: int = 0,
               **kwargs):
    super().__init__(**kwargs)
    self.doc_len, self.seed = doc_len, seed
    self.num_train, self.num_validation = num_train, num_validation


class NeedleHaystack(tfds.core.GeneratorBasedBuilder):
  """Probes of one length at uniform random depths; records {'text', 'depth', 'answer'}."""
  VERSION = tfds.core.Version('1.1.0')  # 1.1: the '#' marker
  BUILDER_CONFIGS = [HaystackConfig(name=f'len{n}', doc_len=n, num_train=16384,
                                    num_validation=256, version='1.1.0')
                     for n in (64, 128, 256, 512)]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description='Pass-key retrieval probes in tiny shakespeare filler.',
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                             'answer': tfds.features.Text(),
                                             'depth': tfds.features.Scalar(np.float32)}))

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    return {'train': self._generate_examples('train', cfg.num_train, cfg.seed),
            'validation': self._generate_examples('validation', cfg.num_validation, cfg.seed + 1)}

  def _generate_examples(self, split: str, num: int, seed: int):
    filler = filler_text(base.TINY_SHAKESPEARE, split)
    rng = np.random.default_rng(seed)
    for i in range(num):
      probe = make_probe(filler, self.builder_config.doc_len, float(rng.uniform()), rng)
      yield i, {'text': probe.prompt + probe.answer, 'answer': probe.answer,
                'depth': probe.depth}


def prepare(name: str, data_dir: str | None) -> None:
  """Generates the dataset `needle_haystack/<config>` (once per data directory)."""
  if not os.path.exists(base.TINY_SHAKESPEARE):
    from train.data import DataError
    raise DataError(f'the needle probe\'s filler is tiny shakespeare at {base.TINY_SHAKESPEARE}, '
                    f'which does not exist')
  builder = tfds.builder(name, data_dir=data_dir or None, file_format='array_record')
  builder.download_and_prepare()
