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


class Oracle:
  """A stand-in model that reads the key after the first '#' and predicts it at the last three
  positions (shift=0), or predicts the digits after it (shift=1, a near miss)."""

  def __init__(self, tokenizer, shift=0):
    from model import ModelConfig
    self.config = ModelConfig(vocab_size=tokenizer.vocab_size)
    self.hash_id = int(tokenizer.encode('#')[0])
    self.vocab, self.shift = tokenizer.vocab_size, shift

  def apply(self, variables, inputs_BxL):
    import jax
    import jax.numpy as jnp
    first = jnp.argmax(inputs_BxL == self.hash_id, axis=1)                     # (B,)
    index = first[:, None] + 1 + self.shift + jnp.arange(haystack.DIGITS)[None]
    key_Bx3 = jnp.take_along_axis(inputs_BxL, index, axis=1)
    logits = jnp.zeros(inputs_BxL.shape + (self.vocab,))
    return logits.at[:, -haystack.DIGITS:].set(jax.nn.one_hot(key_Bx3, self.vocab))


def test_accuracy_grid_counts_retrieved_keys():
  """A model that retrieves scores 1 in every cell; one that copies the wrong digits scores
  (nearly) 0; a learned table too short leaves its lengths out (NaN)."""
  from experiments.needle import probe
  from model import ModelConfig
  from train.tokenizers import CharTokenizer
  tokenizer = CharTokenizer.train([FILLER + haystack.NEEDLE + haystack.QUESTION + '0123456789'])
  lengths, depths = (64, 128), (0.0, 0.5, 1.0)
  right = probe.accuracy_grid(Oracle(tokenizer), {}, tokenizer, FILLER, lengths, depths, num=8)
  np.testing.assert_array_equal(right, np.ones((3, 2)))
  wrong = probe.accuracy_grid(Oracle(tokenizer, shift=1), {}, tokenizer, FILLER, lengths, depths,
                              num=8)
  assert wrong.max() <= 0.25
  short = Oracle(tokenizer)
  short.config = ModelConfig(vocab_size=tokenizer.vocab_size, position='learned', max_len=100)
  grid = probe.accuracy_grid(short, {}, tokenizer, FILLER, lengths, depths, num=2)
  assert (grid[:, 0] == 1).all() and np.isnan(grid[:, 1]).all()
