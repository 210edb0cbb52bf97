"""The needle-in-a-haystack generator (experiments/needle/haystack.py) and its TFDS builder."""

import numpy as np
import pytest

from experiments.needle import haystack

FILLER = ''.join(np.random.default_rng(1).choice(list('abcdefgh \n'), 5000))


@pytest.mark.parametrize('length', [64, 200])
@pytest.mark.parametrize('depth', [0.0, 0.3, 0.5, 1.0])
def test_probe_has_its_needle_at_its_depth(length, depth):
  p = haystack.make_probe(FILLER, length, depth, np.random.default_rng(0))
  text = p.prompt + p.answer
  assert len(text) == length
  assert len(p.answer) == haystack.DIGITS and p.answer.isdigit()
  needle = f' The pass key is #{p.answer}. '
  assert text.count(needle) == 1 and sum(c.isdigit() for c in text) == 2 * haystack.DIGITS
  assert p.prompt.endswith('\nThe pass key is #')
  filler_len = length - len(needle) - len('\nThe pass key is #') - haystack.DIGITS
  at = text.index(needle)
  assert at == p.needle_at == round(depth * filler_len)
  hay = text[:at] + text[at + len(needle):len(p.prompt) - len('\nThe pass key is #')]
  assert len(hay) == filler_len and hay in FILLER   # one unbroken stretch of the filler


def test_probes_are_reproducible_and_vary():
  a = [haystack.make_probe(FILLER, 100, 0.5, np.random.default_rng(3)) for _ in range(2)]
  assert a[0] == a[1]
  rng = np.random.default_rng(3)
  keys = {haystack.make_probe(FILLER, 100, 0.5, rng).answer for _ in range(50)}
  assert len(keys) > 40
  with pytest.raises(ValueError, match='depth'):
    haystack.make_probe(FILLER, 100, 1.5, rng)
  with pytest.raises(ValueError, match='needs'):
    haystack.make_probe(FILLER, haystack.overhead() - 1, 0.5, rng)


def test_builder_writes_whole_probes(tmp_path):
  config = haystack.HaystackConfig(name='test', doc_len=96, num_train=6, num_validation=3,
                                   version='1.1.0')
  builder = haystack.NeedleHaystack(config=config, data_dir=str(tmp_path),
                                    file_format='array_record')
  builder.download_and_prepare()
  sources = builder.as_data_source()
  assert len(sources['train']) == 6 and len(sources['validation']) == 3
  depths = []
  for record in (sources['train'][i] for i in range(6)):
    text, answer = record['text'].decode(), record['answer'].decode()
    assert len(text) == 96 and text.endswith('\nThe pass key is #' + answer)
    assert f' The pass key is #{answer}. ' in text
    depths.append(float(record['depth']))
  assert len(set(depths)) == 6 and all(0 <= d <= 1 for d in depths)
