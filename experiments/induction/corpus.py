"""The induction experiment's corpus: natural text mixed with repeated random segments.

Copying pays on both parts. Natural text (tiny shakespeare) repeats names and words within a
context; the synthetic part makes copying pay much more: lines made of a random segment of
`min_len`..`max_len` characters drawn uniformly from the text's own characters, written `repeats`
times in a row, so every copy after the first is predictable from the first alone, and by
nothing else. The synthetic lines are a TFDS dataset generated in process (`RepeatedSegments`,
like experiments/grokking/arithmetic.py), seeded, about as many characters as the text.

`write_corpus` lays the corpus out as a directory of text files for `config.data.path` (the
`TextCorpus` builder of train/data.py): the text (a link to it) and repeats.txt. Each file's last
`val_fraction` of characters is held out, so validation contexts are held-out text and held-out
segments.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

from model.config import ConfigError
from train.data import generated_records

LINES_PER_RECORD = 200


class RepeatedSegmentsConfig(tfds.core.BuilderConfig):
  def __init__(self, *, alphabet: str, num_chars: int, min_len: int, max_len: int, repeats: int,
               seed: int, **kwargs):
    digest = hashlib.sha1(alphabet.encode()).hexdigest()[:8]
    super().__init__(name=f'chars{num_chars}_len{min_len}to{max_len}_x{repeats}_seed{seed}_'
                          f'alphabet{digest}', **kwargs)
    self.alphabet, self.num_chars = alphabet, num_chars
    self.min_len, self.max_len, self.repeats, self.seed = min_len, max_len, repeats, seed


class RepeatedSegments(tfds.core.GeneratorBasedBuilder):
  """Lines 'segment * repeats', each segment random; records of LINES_PER_RECORD lines, in order,
  until `num_chars` characters."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description='Random segments, each repeated on its line.',
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    rng = np.random.default_rng(cfg.seed)
    alphabet = np.asarray(list(cfg.alphabet))
    written, record = 0, 0
    while written < cfg.num_chars:
      lengths = rng.integers(cfg.min_len, cfg.max_len + 1, LINES_PER_RECORD)
      lines = [''.join(rng.choice(alphabet, n)) * cfg.repeats + '\n' for n in lengths]
      text = ''.join(lines)
      yield record, {'text': text}
      written += len(text)
      record += 1


def check(corpus_cfg) -> None:
  c = corpus_cfg
  if not 1 <= c.min_len <= c.max_len:
    raise ConfigError(f'corpus.min_len={c.min_len} and corpus.max_len={c.max_len}: need '
                      f'1 <= min_len <= max_len')
  if c.repeats < 2:
    raise ConfigError(f'corpus.repeats={c.repeats}: a segment must appear at least twice for '
                      f'copying to pay')
  if c.synthetic_fraction < 0 or c.synthetic_fraction >= 1:
    raise ConfigError(f'corpus.synthetic_fraction={c.synthetic_fraction} must be in [0, 1)')


def write_corpus(corpus_cfg, text_path: str, directory: str, tfds_data_dir: str = '') -> str:
  """DIR with the text (a link) and repeats.txt, `synthetic_fraction` of the corpus's characters
  (none: the text alone). Written once; a directory that exists is reused as it is."""
  check(corpus_cfg)
  if not os.path.exists(text_path):
    from train.data import DataError
    raise DataError(f'the text corpus {text_path} does not exist; pass an existing text file as '
                    f'--config.corpus.text_path')
  if os.path.isdir(directory):
    return directory
  with open(text_path, encoding='utf-8') as f:
    text = f.read()
  os.makedirs(directory + '.tmp', exist_ok=True)
  os.symlink(os.path.abspath(text_path), os.path.join(directory + '.tmp', 'text.txt'))
  fraction = corpus_cfg.synthetic_fraction
  if fraction > 0:
    alphabet = ''.join(sorted(set(text) - {'\n'}))
    config = RepeatedSegmentsConfig(
        alphabet=alphabet, num_chars=int(len(text) * fraction / (1 - fraction)),
        min_len=corpus_cfg.min_len, max_len=corpus_cfg.max_len, repeats=corpus_cfg.repeats,
        seed=corpus_cfg.seed, version=RepeatedSegments.VERSION)
    builder = RepeatedSegments(config=config, data_dir=tfds_data_dir or None,
                               file_format='array_record')
    with open(os.path.join(directory + '.tmp', 'repeats.txt'), 'w', encoding='utf-8') as f:
      for record in generated_records(builder)['train']:
        f.write(record['text'].decode('utf-8'))
  os.rename(directory + '.tmp', directory)  # complete or absent
  return directory
