"""Text data: TFDS builders and data sources -> token streams -> packed, shuffled, resumable batches.

Two ways to name a corpus in `config.data`:
  * `path`: a local text file, or a directory of `*.txt` files (the TFDS manual directory of the
    `TextCorpus` builder below). Each file is one document; its first (1 - val_fraction) of
    characters is the training split and the rest validation (nanoGPT's 90/10 split of tiny
    shakespeare). The builder writes array_record files, read back through `tfds.data_source`, so
    no TensorFlow is needed.
  * `tfds_name`: any TFDS catalog dataset with a text feature (`text_key`), e.g. 'tiny_shakespeare'
    or 'lm1b'; each record is one document. Its splits are `train_split` / `val_split`.

Documents are tokenized once into one stream per split (the tokenizer's end-of-text id between
documents, when it has one), cached as .npy files. A stream is cut into sequences of seq_len + 1
tokens overlapping by one, so every token is a target exactly once. Training batches come from a
grain `MapDataset` (shuffled afresh each epoch, repeated): batch i is a pure function of (seed, i),
so the iterator's state is one index, saved with every checkpoint. Each process reads only its
own rows, and a grain thread prepares the next batches while the device computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import socket
from typing import Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds

from train.progress import bar, phase
from train.tokenizers import Tokenizer


class DataError(ValueError):
  """A corpus that is missing, empty or unreadable; the message says where to put it."""


# ---------------------------------------------------------------------------------------------
# The TFDS builder for plain-text corpora.


class TextCorpusConfig(tfds.core.BuilderConfig):
  """One corpus: its files (or manual directory) and the validation fraction."""

  def __init__(self, *, files: tuple[str, ...], val_fraction: float, chunk_chars: int = 1 << 16,
               **kwargs):
    super().__init__(**kwargs)
    self.files = files
    self.val_fraction = val_fraction
    self.chunk_chars = chunk_chars


class TextCorpus(tfds.core.GeneratorBasedBuilder):
  """Plain-text files, one document each, split by characters into train and validation.

  Records are chunks of about 64k characters cut at line ends, in document order (shuffling on
  write is disabled), with the id of the document they belong to.
  """
  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = ('Put the corpus as one or more UTF-8 `*.txt` files in the manual '
                                  'directory, or pass a single file as config.data.path.')

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description='Plain-text corpus split by characters.',
        disable_shuffling=True,  # keep generation order: the records concatenate to the text
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                             'document': tfds.features.Scalar(np.int64)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples('train'),
            'validation': self._generate_examples('validation')}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    for doc, path in enumerate(cfg.files):
      with open(path, encoding='utf-8') as f:
        text = f.read()
      cut = int(len(text) * (1.0 - cfg.val_fraction))
      part = text[:cut] if split == 'train' else text[cut:]
      for j, chunk in enumerate(_chunks(part, cfg.chunk_chars)):
        yield f'{doc:06d}_{j:09d}', {'text': chunk, 'document': doc}


def _chunks(text: str, size: int) -> Iterator[str]:
  """Pieces of about `size` characters, cut after a newline where one is near."""
  start = 0
  while start < len(text):
    end = min(start + size, len(text))
    if end < len(text):
      newline = text.rfind('\n', start + size // 2, end)
      end = newline + 1 if newline >= 0 else end
    yield text[start:end]
    start = end


def _corpus_files(path: str) -> tuple[str, ...]:
  if os.path.isdir(path):
    files = tuple(sorted(glob.glob(os.path.join(path, '**', '*.txt'), recursive=True)))
    if not files:
      raise DataError(f'no *.txt files under {path}; put the corpus there as UTF-8 text files')
    return files
  if not os.path.exists(path):
    raise DataError(f'corpus not found: {path} does not exist; pass an existing text file or '
                    f'directory as --config.data.path')
  return (path,)


def text_corpus_builder(path: str, val_fraction: float, data_dir: str | None) -> TextCorpus:
  """The builder for the corpus at `path`; its config name follows the files' identity, so a
  changed file is prepared again and different corpora never share a directory."""
  files = tuple(os.path.abspath(f) for f in _corpus_files(path))
  total = sum(os.path.getsize(f) for f in files)
  if total == 0:
    raise DataError(f'the corpus at {path} is empty; it needs text to train on')
  identity = json.dumps([[f, os.path.getsize(f), os.path.getmtime(f)] for f in files]
                        + [val_fraction])
  slug = re.sub(r'[^a-z0-9]+', '_', os.path.basename(os.path.normpath(path)).lower()).strip('_')
  name = f'{slug or "corpus"}_{hashlib.sha1(identity.encode()).hexdigest()[:10]}'
  config = TextCorpusConfig(name=name, files=files, val_fraction=val_fraction,
                            version=TextCorpus.VERSION)
  return TextCorpus(config=config, data_dir=data_dir or None, file_format='array_record')


def corpus_identity(path: str) -> list[list]:
  """[[file relative to `path`, bytes, sha256 of its content], ...] of the corpus at `path`: what
  a run records when it tokenizes the corpus, so that resuming after the files changed in place
  is noticed (`check_corpus`). Reads every byte once (about a second per GB)."""
  root = path if os.path.isdir(path) else os.path.dirname(path)
  identity = []
  for f in _corpus_files(path):
    digest = hashlib.sha256()
    with open(f, 'rb') as file:
      for block in iter(lambda: file.read(1 << 24), b''):
        digest.update(block)
    identity.append([os.path.relpath(f, root), os.path.getsize(f), digest.hexdigest()])
  return identity


def check_corpus(path: str, recorded: list[list]) -> None:
  """Raises DataError when the corpus at `path` is not the one `recorded` (`corpus_identity`)
  describes: a run resumed there would go on training on its stored copy of the old text."""
  now = corpus_identity(path)
  if now == recorded:
    return
  before, after = {f: (n, h) for f, n, h in recorded}, {f: (n, h) for f, n, h in now}
  changed = sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))
  raise DataError(
      f'the corpus at data.path={path} changed since this run tokenized it ({len(changed)} '
      f'file(s) differ: {", ".join(changed[:3])}{", ..." if len(changed) > 3 else ""}); '
      f'resuming would go on training on the old text. Restore the files, or train on the new '
      f'text in a new --workdir (with --init_from=THIS_RUN to start from its parameters).')


# ---------------------------------------------------------------------------------------------
# Documents per split.


def _prepare(builder: tfds.core.DatasetBuilder, what: str) -> None:
  """Prepares a local builder's files unless they exist, saying `what` it does. TFDS would print
  "Downloading and preparing dataset": nothing is downloaded, so its words are kept out."""
  if not builder.is_prepared():
    with phase(what), contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare()


def generated_records(builder: tfds.core.DatasetBuilder) -> dict[str, list[dict]]:
  """{split: every record} of a builder whose examples are generated in process (the synthetic
  tasks): prepared once as array_record files, read back with one batched read per split."""
  _prepare(builder, f'generating the {builder.name} task as TFDS array_record files in '
                    f'{builder.data_dir} (once per task configuration)')
  return {split: source.__getitems__(range(len(source)))
          for split, source in builder.as_data_source().items()}


def load_documents(data_cfg) -> dict[str, list[str]]:
  """{'train': [...], 'validation': [...]} documents of the configured corpus."""
  data_dir = data_cfg.tfds_data_dir or None
  if data_cfg.path and (os.path.exists(data_cfg.path) or not data_cfg.tfds_fallback):
    builder = text_corpus_builder(data_cfg.path, data_cfg.val_fraction, data_dir)
    _prepare(builder, f'writing {data_cfg.path} as TFDS array_record files in '
                      f'{builder.data_dir} (once per corpus)')
    sources = builder.as_data_source()
    docs = {split: _documents_by_id(sources[split], split) for split in ('train', 'validation')}
  else:
    name = data_cfg.tfds_name or data_cfg.tfds_fallback
    if not name:
      raise DataError('no corpus configured: set --config.data.path to a text file or directory, '
                      'or --config.data.tfds_name to a TFDS catalog dataset')
    docs = {'train': _catalog_documents(name, data_cfg.train_split, data_cfg, data_dir),
            'validation': _catalog_documents(name, data_cfg.val_split, data_cfg, data_dir)}
  for split, texts in docs.items():
    if not any(texts):
      raise DataError(f'the {split} split of the corpus is empty '
                      f'({data_cfg.path or data_cfg.tfds_name}); give it more text')
  return docs


def _documents_by_id(source, split: str) -> list[str]:
  docs: list[list[str]] = []
  last = None
  for record in bar(map(source.__getitem__, range(len(source))), len(source),
                    f'reading the {split} split', unit='record'):
    if record['document'] != last:
      docs.append([])
      last = record['document']
    docs[-1].append(record['text'].decode('utf-8'))
  return [''.join(parts) for parts in docs]


def _catalog_documents(name: str, split: str, data_cfg, data_dir: str | None) -> list[str]:
  builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared() and not _online():
    missing = (f'{data_cfg.path} does not exist, and ' if data_cfg.path else '')
    raise DataError(
        f'{missing}the TFDS dataset {name!r} is not prepared under {builder.data_dir} and this '
        f'machine is offline, so it cannot be downloaded. Put the corpus at '
        f'{data_cfg.path or "a local path"} (for tiny shakespeare, the char-rnn input.txt) and '
        f'pass --config.data.path=PATH, or prepare {name!r} on a machine that is online.')
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # TFDS raises many kinds: not found, no such split, failed download
    raise DataError(f'could not read TFDS dataset {name!r} split {split!r}: {e}') from e
  key = data_cfg.text_key
  docs = []
  for record in bar(map(source.__getitem__, range(len(source))), len(source),
                    f'reading {name} {split}', unit='record'):
    if key not in record:
      raise DataError(f'TFDS dataset {name!r} has no feature {key!r}; its features are '
                      f'{sorted(record)}; set --config.data.text_key')
    value = record[key]
    docs.append(value.decode('utf-8') if isinstance(value, bytes) else str(value))
  return docs


def _online(host: str = 'storage.googleapis.com', timeout: float = 3.0) -> bool:
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
    return True
  except OSError:
    return False


# ---------------------------------------------------------------------------------------------
# Token streams and batches.


@dataclasses.dataclass(frozen=True)
class Split:
  tokens: np.ndarray     # (num_tokens,) the whole split as one stream
  num_bytes: int         # UTF-8 bytes of its text: the denominator of bits per byte
  num_chars: int         # characters of its text: the denominator of bits per character


def tokenize(tokenizer: Tokenizer, docs: list[str], split: str = '') -> Split:
  parts = []
  for doc in bar(docs, len(docs), f'tokenizing the {split} split'.replace('  ', ' '),
                 unit='document'):
    parts.append(tokenizer.encode(doc))
    if tokenizer.eos_id is not None:
      parts.append(np.asarray([tokenizer.eos_id], dtype=np.int32))
  dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
  tokens = np.concatenate(parts).astype(dtype)
  return Split(tokens, sum(len(d.encode('utf-8')) for d in docs), sum(len(d) for d in docs))


def save_split(split: Split, path: str) -> None:
  np.save(path + '.npy', split.tokens)
  with open(path + '.json', 'w') as f:
    json.dump({'num_bytes': split.num_bytes, 'num_chars': split.num_chars}, f)


def load_split(path: str) -> Split | None:
  if not (os.path.exists(path + '.npy') and os.path.exists(path + '.json')):
    return None
  with open(path + '.json') as f:
    meta = json.load(f)
  return Split(np.load(path + '.npy', mmap_mode='r'), meta['num_bytes'], meta['num_chars'])


class PackedSequences:
  """Random access to the stream cut into (seq_len + 1)-token windows: window i starts at
  i * seq_len, so consecutive windows share one token and each token is predicted once."""

  def __init__(self, tokens: np.ndarray, seq_len: int, split: str = 'a'):
    self.tokens = tokens
    self.seq_len = seq_len
    self.num = (len(tokens) - 1) // seq_len
    if self.num < 1:
      raise DataError(f'{split} split of {len(tokens)} tokens is shorter than one sequence of '
                      f'data.seq_len + 1 = {seq_len + 1}; use more text (data.val_fraction for '
                      f'the validation split) or a shorter data.seq_len')

  def __len__(self) -> int:
    return self.num

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self.seq_len
    return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)


def _to_batch(windows_BxL1: np.ndarray) -> dict[str, np.ndarray]:
  return {'inputs': windows_BxL1[:, :-1], 'targets': windows_BxL1[:, 1:]}


def process_blocks(source, batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> grain.MapDataset:
  """Infinite batches of `source`'s rows (random access), stacked: this process's rows of each
  global batch, and only those are read. The shuffled rows (reshuffled every epoch) are cut into
  blocks of batch_size / process_count; global batch i is blocks i * P .. i * P + P - 1 and
  process p reads block i * P + p, so the data order does not depend on the number of processes."""
  if batch_size % process_count:
    raise DataError(f'train.batch_size={batch_size} is not divisible by the {process_count} '
                    f'processes; each loads an equal share')
  rows = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  return rows.batch(batch_size // process_count)[process_index::process_count]


def train_dataset(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Infinite batches {'inputs', 'targets'} of (batch_size / process_count, seq_len), this
  process's rows (`process_blocks`) of the stream's windows."""
  return process_blocks(PackedSequences(tokens, seq_len), batch_size, seed, process_index,
                        process_count).map(_to_batch)


class BatchIterator:
  """Yields training batches, `steps` of them stacked at a time. A grain thread prepares the next
  ones while the device computes. Its state, the index of the next batch it hands out, goes into
  every checkpoint; a resumed iterator starts there."""

  def __init__(self, dataset: grain.MapDataset, start: int = 0, prefetch: int = 64):
    self.next_index = start
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)
    self._batches = iter(dataset[start:].to_iter_dataset(options))

  def next(self, steps: int) -> dict[str, np.ndarray]:
    """The next `steps` batches stacked on a leading axis: (steps, B, L) each."""
    batches = [next(self._batches) for _ in range(steps)]
    self.next_index += steps
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}

  def state(self) -> dict:
    return {'next_index': self.next_index}


def num_eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                     max_batches: int = -1) -> int:
  """How many batches `eval_batches` yields."""
  num = -(-len(PackedSequences(tokens, seq_len)) // batch_size)
  return num if max_batches < 0 else min(num, max_batches)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int = -1,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The split in order, as batches with 'weights' (0 on padding rows of the last batch); all of
  it when max_batches < 0. Each batch is this process's rows of the global batch of batch_size
  rows, as in `train_dataset`."""
  if batch_size % process_count:
    raise DataError(f'train.eval_batch_size={batch_size} is not divisible by the '
                    f'{process_count} processes; each loads an equal share')
  rows = batch_size // process_count
  seqs = PackedSequences(tokens, seq_len)
  for b in range(num_eval_batches(tokens, seq_len, batch_size, max_batches)):
    start = b * batch_size + process_index * rows
    idx = np.arange(start, start + rows)
    valid = idx < len(seqs)
    windows = np.stack([seqs[i] for i in np.where(valid, idx, 0)])
    batch = _to_batch(windows)
    batch['weights'] = np.broadcast_to(valid[:, None], batch['targets'].shape).astype(np.float32)
    yield batch
