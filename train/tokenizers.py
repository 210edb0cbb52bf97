"""Tokenizers: character-level, byte-level, and SentencePiece BPE / unigram.

Each is trained (or built) from the training split, saved in the run's work directory under
`tokenizer/`, and loaded back by evaluation and sampling with `load`. `decode(encode(s)) == s` for
every string the tokenizer can represent: all strings for bytes and SentencePiece (byte fallback),
strings over the training characters for `char`.
"""

from __future__ import annotations

import io
import json
import os
from typing import Iterable, Protocol

import numpy as np

KINDS = ('char', 'byte', 'bpe', 'unigram')
_META = 'tokenizer.json'


class TokenizerError(ValueError):
  """Text the tokenizer cannot encode, or a tokenizer directory that cannot be read."""


class Tokenizer(Protocol):
  kind: str
  vocab_size: int
  eos_id: int | None    # appended between documents when packing; None: documents just join

  def encode(self, text: str) -> np.ndarray: ...
  def decode(self, ids: Iterable[int]) -> str: ...
  def save(self, directory: str) -> None: ...


class CharTokenizer:
  """One id per distinct character of the training text, in sorted order (nanoGPT's scheme)."""
  kind = 'char'
  eos_id = None

  def __init__(self, chars: str):
    self.chars = chars
    self.vocab_size = len(chars)
    self._ids = {c: i for i, c in enumerate(chars)}
    self._table = np.array(list(chars))

  @classmethod
  def train(cls, texts: Iterable[str]) -> 'CharTokenizer':
    chars = set()
    for text in texts:
      chars.update(text)
    if not chars:
      raise TokenizerError('cannot build a character vocabulary from an empty training split')
    return cls(''.join(sorted(chars)))

  def encode(self, text: str) -> np.ndarray:
    try:
      return np.fromiter((self._ids[c] for c in text), dtype=np.int32, count=len(text))
    except KeyError:
      unknown = sorted(set(text) - set(self._ids))
      raise TokenizerError(
          f'text has {len(unknown)} character(s) outside the character vocabulary: '
          f'{unknown[:10]}; the vocabulary is the {self.vocab_size} characters of the training '
          f'split (use a byte or SentencePiece tokenizer for open text)') from None

  def decode(self, ids: Iterable[int]) -> str:
    return ''.join(self._table[np.asarray(list(ids), dtype=np.int64)])

  def save(self, directory: str) -> None:
    _write_meta(directory, {'kind': self.kind, 'chars': self.chars})


class ByteTokenizer:
  """UTF-8 bytes: 256 ids, no training, any text."""
  kind = 'byte'
  eos_id = None
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(np.asarray(list(ids), dtype=np.uint8)).decode('utf-8', errors='replace')

  def save(self, directory: str) -> None:
    _write_meta(directory, {'kind': self.kind})


class SentencePieceTokenizer:
  """SentencePiece BPE or unigram with byte fallback, identity normalisation and no dummy prefix,
  so that decoding gives back exactly the text that was encoded."""

  def __init__(self, kind: str, model_proto: bytes):
    import sentencepiece as spm
    self.kind = kind
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.vocab_size()
    self.eos_id = self._sp.eos_id()

  @classmethod
  def train(cls, kind: str, texts: Iterable[str], vocab_size: int,
            max_sentences: int = 2_000_000) -> 'SentencePieceTokenizer':
    import sentencepiece as spm
    texts = list(texts)
    # Byte fallback keeps 256 byte pieces besides every character of the text, plus 3 specials.
    needed = 256 + len(set().union(*map(set, texts))) + 3
    if vocab_size < needed:
      raise TokenizerError(f'data.vocab_size={vocab_size} is too small for a {kind} tokenizer of '
                           f'this corpus: 256 byte pieces, its characters and 3 specials need '
                           f'at least {needed}')

    def lines():
      for text in texts:
        yield from (line for line in text.split('\n') if line)

    proto = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=lines(), model_writer=proto, vocab_size=vocab_size, model_type=kind,
          character_coverage=1.0, byte_fallback=True, normalization_rule_name='identity',
          add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
          allow_whitespace_only_pieces=True, user_defined_symbols=['\n'],
          unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, input_sentence_size=max_sentences,
          shuffle_input_sentence=True, minloglevel=2)
    except RuntimeError as e:
      raise TokenizerError(f'SentencePiece {kind} training failed: {e}') from e
    return cls(kind, proto.getvalue())

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'spm.model'), 'wb') as f:
      f.write(self.model_proto)
    _write_meta(directory, {'kind': self.kind, 'model': 'spm.model'})


def train(kind: str, texts: Iterable[str], vocab_size: int = 0) -> Tokenizer:
  """Builds a tokenizer of `kind` from the training texts."""
  if kind == 'char':
    return CharTokenizer.train(texts)
  if kind == 'byte':
    return ByteTokenizer()
  if kind in ('bpe', 'unigram'):
    return SentencePieceTokenizer.train(kind, texts, vocab_size)
  raise TokenizerError(f'data.tokenizer={kind!r} is not known; choose one of {list(KINDS)}')


def load(directory: str) -> Tokenizer:
  path = os.path.join(directory, _META)
  if not os.path.exists(path):
    raise TokenizerError(f'no tokenizer at {directory} (expected {_META}); train a run there first')
  with open(path) as f:
    meta = json.load(f)
  if meta['kind'] == 'char':
    return CharTokenizer(meta['chars'])
  if meta['kind'] == 'byte':
    return ByteTokenizer()
  with open(os.path.join(directory, meta['model']), 'rb') as f:
    return SentencePieceTokenizer(meta['kind'], f.read())


def _write_meta(directory: str, meta: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, _META), 'w') as f:
    json.dump(meta, f, indent=1)
