"""Language modelling (pretraining): next-token cross-entropy on a text corpus.

The corpus (`config.data`) is tokenised once into one stream per split, cached in the work
directory (train/workdir.py), and cut into windows of seq_len + 1 tokens (train/data.py). The
validation metrics are the loss per token, perplexity and bits per character and byte.
"""

from __future__ import annotations

import json
import math
import os

import jax.numpy as jnp

from train import data as data_lib
from train import step as step_lib
from train import workdir as workdir_lib
from train.objectives.base import Data, Objective


CORPUS_FILE = 'data/corpus.json'  # the identity of the text files tokenized (data.path)


class LanguageModeling(Objective):
  name = 'lm'
  corpus = None  # the identity of data.path's files (data.corpus_identity), when tokenized now

  def data(self, workdir: str, start) -> Data:
    prepared = workdir_lib.load_data(workdir)
    path = self.config.data.path
    if prepared is not None:
      recorded = os.path.join(workdir, CORPUS_FILE)
      if path and os.path.exists(path) and os.path.exists(recorded):
        with open(recorded) as f:
          data_lib.check_corpus(path, json.load(f))
      data = Data(*prepared)
    else:
      data = Data(*workdir_lib.build_data(self.config, self.tokenizer_from(start)), built=True)
      if path and os.path.exists(path):  # a local corpus (not TFDS's catalog)
        self.corpus = data_lib.corpus_identity(path)
    # Each split holds one sequence at least: checked now, not at the first batch or the final
    # evaluation, after the run has written its files and trained.
    for name, split in (('the training', data.train), ('the validation', data.validation)):
      data_lib.PackedSequences(split.tokens, self.config.data.seq_len, name)
    return data

  def tokenizer_from(self, start):
    """The tokenizer a new run encodes its corpus with: the start run's, or None (one is trained
    on the corpus)."""
    return start.tokenizer if start is not None else None

  def save(self, workdir: str, data: Data) -> None:
    workdir_lib.save_data(workdir, data.tokenizer, data.train, data.validation)
    if self.corpus is not None:
      with open(os.path.join(workdir, CORPUS_FILE), 'w') as f:
        json.dump(self.corpus, f)

  def train_dataset(self, data: Data, process_index: int, process_count: int):
    tc = self.config.train
    return data_lib.train_dataset(data.train.tokens, self.config.data.seq_len, tc.batch_size,
                                  tc.seed, process_index, process_count)

  def loss_fn(self, model):
    return step_lib.make_loss_fn(model, dropout=model.config.dropout > 0)

  def eval_batches(self, data: Data, max_batches: int, process_index: int, process_count: int):
    return data_lib.eval_batches(data.validation.tokens, self.config.data.seq_len,
                                 self.config.train.eval_batch_size, max_batches, process_index,
                                 process_count)

  def num_eval_batches(self, data: Data, max_batches: int) -> int:
    return data_lib.num_eval_batches(data.validation.tokens, self.config.data.seq_len,
                                     self.config.train.eval_batch_size, max_batches)

  def eval_spec(self):
    shape = (self.config.train.eval_batch_size, self.config.data.seq_len)
    return {'inputs': (shape, jnp.int32), 'targets': (shape, jnp.int32),
            'weights': (shape, jnp.float32)}

  def eval_fn(self, model):
    return step_lib.make_eval_fn(model)

  def summarize(self, sums: dict, data: Data) -> dict:
    """Bits per character/byte scale the loss by the split's tokens per character/byte, so they
    compare across tokenizers."""
    loss = sums['loss'] / sums['weight']
    split = data.validation
    tokens_in_split = len(split.tokens)
    return {'val_loss': loss,
            'val_perplexity': math.exp(min(loss, 700.0)),
            'val_bits_per_char': loss * tokens_in_split / split.num_chars / math.log(2),
            'val_bits_per_byte': loss * tokens_in_split / split.num_bytes / math.log(2),
            'val_tokens': int(sums['weight'])}
