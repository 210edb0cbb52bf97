"""The TFDS text builder, packing, and the resumable, host-shardable batch order."""

import os

import ml_collections
import numpy as np
import pytest

from train import data
from train.data import DataError


def data_config(path, tmp_path, **kw):
  c = dict(path=path, tfds_name='', tfds_fallback='', tfds_data_dir=str(tmp_path / 'tfds'),
           text_key='text', train_split='train', val_split='validation', val_fraction=0.1)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_shakespeare_splits_like_nanogpt(shakespeare_path, tmp_path):
  docs = data.load_documents(data_config(shakespeare_path, tmp_path))
  with open(shakespeare_path) as f:
    text = f.read()
  cut = int(len(text) * 0.9)
  assert docs['train'] == [text[:cut]] and docs['validation'] == [text[cut:]]
  # Prepared once: a second load reads the array_record files back.
  assert os.listdir(tmp_path / 'tfds' / 'text_corpus')
  assert data.load_documents(data_config(shakespeare_path, tmp_path)) == docs


def test_a_directory_is_a_corpus_of_documents(tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  (corpus / 'a.txt').write_text('0123456789' * 10)
  (corpus / 'b.txt').write_text('abcdefghij' * 10)
  (corpus / 'notes.md').write_text('ignored')
  docs = data.load_documents(data_config(str(corpus), tmp_path, val_fraction=0.2))
  assert docs['train'] == ['0123456789' * 8, 'abcdefghij' * 8]
  assert docs['validation'] == ['0123456789' * 2, 'abcdefghij' * 2]


def test_missing_or_empty_corpus(tmp_path):
  with pytest.raises(DataError, match='does not exist'):
    data.load_documents(data_config(str(tmp_path / 'nope.txt'), tmp_path))
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(DataError, match='is empty'):
    data.load_documents(data_config(str(tmp_path / 'empty.txt'), tmp_path))
  (tmp_path / 'dir').mkdir()
  with pytest.raises(DataError, match=r'no \*.txt files'):
    data.load_documents(data_config(str(tmp_path / 'dir'), tmp_path))


def test_offline_fallback_says_where_to_put_the_corpus(tmp_path, monkeypatch):
  monkeypatch.setattr(data, '_online', lambda *a, **k: False)
  cfg = data_config(str(tmp_path / 'input.txt'), tmp_path, tfds_fallback='tiny_shakespeare')
  with pytest.raises(DataError, match=r'input.txt does not exist.*offline.*Put the corpus at'):
    data.load_documents(cfg)


def test_packed_sequences_predict_every_token_once():
  tokens = np.arange(23)
  seqs = data.PackedSequences(tokens, seq_len=5)
  assert len(seqs) == 4
  np.testing.assert_array_equal(seqs[1], [5, 6, 7, 8, 9, 10])
  targets = np.concatenate([seqs[i][1:] for i in range(len(seqs))])
  np.testing.assert_array_equal(targets, np.arange(1, 21))
  with pytest.raises(DataError, match='shorter than one sequence'):
    data.PackedSequences(np.arange(5), seq_len=8)


def test_training_batches_are_reproducible_resumable_and_reshuffled():
  tokens = np.arange(1000)
  ds = data.train_dataset(tokens, seq_len=8, batch_size=4, seed=3)
  run = data.BatchIterator(ds)
  first = run.next(5)
  assert first['inputs'].shape == (5, 4, 8)
  np.testing.assert_array_equal(first['targets'][:, :, :-1], first['inputs'][:, :, 1:])
  rest = run.next(3)
  resumed = data.BatchIterator(ds, start=run.state()['next_index'] - 3)
  np.testing.assert_array_equal(resumed.next(3)['inputs'], rest['inputs'])
  # One epoch is 124 sequences = 31 batches; each epoch visits every sequence once, in a new order.
  epoch = lambda e: np.concatenate([ds[i]['inputs'] for i in range(31 * e, 31 * (e + 1))])
  e0, e1 = epoch(0), epoch(1)
  assert len({tuple(r) for r in e0}) == 124
  assert sorted(map(tuple, e0)) == sorted(map(tuple, e1)) and not np.array_equal(e0, e1)


def test_each_process_loads_its_rows_of_the_global_batch():
  tokens = np.arange(500)
  whole = data.train_dataset(tokens, 8, batch_size=6, seed=0)[4]['inputs']
  parts = [data.train_dataset(tokens, 8, batch_size=6, seed=0, process_index=p,
                              process_count=3)[4]['inputs'] for p in range(3)]
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  with pytest.raises(DataError, match='not divisible'):
    data.train_dataset(tokens, 8, batch_size=6, seed=0, process_count=4)


def test_eval_batches_cover_the_split_with_padding_weights():
  tokens = np.arange(45)
  batches = list(data.eval_batches(tokens, seq_len=4, batch_size=3))
  assert len(batches) == 4  # 11 sequences
  weights = np.concatenate([b['weights'] for b in batches])
  assert weights.sum() == 11 * 4
  targets = np.concatenate([b['targets'] for b in batches])[weights[:, 0] > 0]
  np.testing.assert_array_equal(targets.ravel(), np.arange(1, 45))
  assert len(list(data.eval_batches(tokens, 4, 3, max_batches=2))) == 2


def test_a_generated_task_is_prepared_without_tfds_download_words(tmp_path, capfd):
  from experiments.grokking import arithmetic
  task_cfg = ml_collections.ConfigDict(dict(operation='add', prime=7, train_fraction=0.5, seed=0,
                                            tfds_data_dir=str(tmp_path)))
  task = arithmetic.load(task_cfg)
  assert len(task.train['targets']) + len(task.validation['targets']) == 49
  out, err = capfd.readouterr()
  assert 'Downloading' not in out + err and 'generating the arithmetic_table task' in err
