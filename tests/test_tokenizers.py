"""Tokenizers round-trip text, save and load with a run, and reject what they cannot encode."""

import numpy as np
import pytest

from train import tokenizers
from train.tokenizers import TokenizerError


@pytest.fixture(scope='module')
def corpus(shakespeare_path):
  with open(shakespeare_path) as f:
    text = f.read()
  return text[:200_000], text[-20_000:]


@pytest.mark.parametrize('kind, vocab_size', [('char', 0), ('byte', 0), ('bpe', 400),
                                              ('unigram', 400)])
def test_round_trip_save_and_load(kind, vocab_size, corpus, tmp_path):
  train_text, held_out = corpus
  tok = tokenizers.train(kind, [train_text], vocab_size)
  ids = tok.encode(held_out)
  assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == held_out
  tok.save(str(tmp_path))
  loaded = tokenizers.load(str(tmp_path))
  assert (loaded.kind, loaded.vocab_size, loaded.eos_id) == (kind, tok.vocab_size, tok.eos_id)
  np.testing.assert_array_equal(loaded.encode(held_out), ids)
  if kind in ('bpe', 'unigram'):
    assert tok.vocab_size == vocab_size
    assert len(ids) < 0.7 * len(held_out)  # subwords: fewer tokens than characters


def test_char_vocabulary_is_the_training_characters():
  tok = tokenizers.train('char', ['hello', 'world'])
  assert tok.chars == 'dehlorw' and tok.vocab_size == 7
  np.testing.assert_array_equal(tok.encode('held'), [2, 1, 3, 0])


def test_char_tokenizer_names_characters_it_does_not_know():
  tok = tokenizers.train('char', ['abc'])
  with pytest.raises(TokenizerError, match=r"outside the character vocabulary: \['z', '☃'\]"):
    tok.encode('abz☃')


@pytest.mark.parametrize('text', ['', 'plain ascii', 'tabs\tand\nnewlines  \n', 'ünïcödé ☃ 😀'])
def test_byte_and_sentencepiece_encode_any_text(text, corpus):
  for tok in (tokenizers.train('byte', []), tokenizers.train('bpe', [corpus[0]], 400)):
    assert tok.decode(tok.encode(text)) == text


def test_errors():
  with pytest.raises(TokenizerError, match='not known'):
    tokenizers.train('wordpiece', ['x'])
  with pytest.raises(TokenizerError, match='need at least 261'):
    tokenizers.train('bpe', ['xy'], 260)
  with pytest.raises(TokenizerError, match='empty training split'):
    tokenizers.train('char', [''])
  with pytest.raises(TokenizerError, match='no tokenizer at'):
    tokenizers.load('/nonexistent')
