"""Recall tasks: the generators produce what they claim, the loss falls on the answers only, and an
attention model with hand-set weights that implements lookup solves MQAR exactly."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

import experiments.recall.__main__ as recall_sweep
from experiments.configs import recall as recall_config
from experiments.recall import objective as recall_objective
from experiments.recall import tasks
from model import LM
from model.config import ConfigError
from train.objectives.base import Data
from tests.conftest import tiny


def test_mqar_answers_are_the_values_of_their_keys():
  vocab, seq_len, pairs, queries = 32, 40, 6, 4
  tokens, answers = tasks.generate('mqar', vocab, seq_len, pairs, queries, num=50, seed=3)
  assert tokens.shape == answers.shape == (50, seq_len + 1)
  k = tasks.num_keys(vocab)
  for row, answer in zip(tokens, answers):
    # The reference: read the pairs off the front of the row, then check every answer.
    table = {int(row[i]): int(row[i + 1]) for i in range(0, 2 * pairs, 2)}
    assert len(table) == pairs and set(table) <= set(range(1, k + 1))
    assert set(table.values()) <= set(range(k + 1, vocab))
    where = np.flatnonzero(answer)
    assert len(where) == queries and where.min() > 2 * pairs
    asked = [int(row[i - 1]) for i in where]
    assert len(set(asked)) == queries and all(row[i] == table[row[i - 1]] for i in where)
    # Everything after the pairs that is neither a query nor its answer is the 0 filler.
    rest = np.ones(seq_len + 1, bool)
    rest[:2 * pairs] = False
    rest[where] = rest[where - 1] = False
    assert not row[rest].any()
  # Queries land in different slots from row to row.
  assert len({tuple(np.flatnonzero(a)) for a in answers}) > 10


def test_selective_copy_target_is_the_non_noise_tokens_in_order():
  vocab, seq_len, num = 16, 30, 5
  tokens, answers = tasks.generate('selective_copy', vocab, seq_len, num, 0, num=50, seed=1)
  for row, answer in zip(tokens, answers):
    sep = list(row).index(tasks.SEPARATOR)
    content = [t for t in row[:sep] if t != tasks.NOISE]
    assert len(content) == num and all(t >= tasks.FIRST_CONTENT for t in content)
    assert list(row[answer == 1]) == content
    assert np.flatnonzero(answer).tolist() == list(range(sep + 1, seq_len + 1))


def task_config(tfds_dir, **overrides):
  c = ConfigDict(dict(name='mqar', vocab=32, seq_len=24, num_pairs=4, num_queries=0,
                      num_tokens=4, num_train=64, num_test=16, seed=0, tfds_data_dir=tfds_dir))
  c.update(overrides)
  return c


def test_tfds_task_splits_are_held_out_and_checked(tfds_dir):
  task = tasks.load(task_config(tfds_dir))
  assert task.train['tokens'].shape == (64, 25) and task.vocab_size == 32
  assert 0 < len(task.test['tokens']) <= 16
  train_rows = {r.tobytes() for r in task.train['tokens']}
  assert not any(r.tobytes() in train_rows for r in task.test['tokens'])
  # The same generator, the same seed: what TFDS stored is what `generate` makes.
  tokens, answers = tasks.generate('mqar', 32, 24, 4, 4, 64, seed=0)
  np.testing.assert_array_equal(task.train['tokens'], tokens)
  np.testing.assert_array_equal(task.train['answer'], answers)
  with pytest.raises(ConfigError, match='raise task.seq_len'):
    tasks.load(task_config(tfds_dir, num_pairs=10))
  with pytest.raises(ConfigError, match='raise task.vocab'):
    tasks.load(task_config(tfds_dir, vocab=8, seq_len=64, num_pairs=5))


def test_loss_falls_on_answer_positions_only():
  tokens, answers = tasks.generate('mqar', 32, 24, 4, 4, num=4, seed=0)
  batch = recall_objective.as_recall_batch({'tokens': tokens,
                                            'weights': answers.astype(np.float32),
                                            'valid': np.ones(4, np.float32)})
  model = LM(tiny(vocab_size=32))
  params = jax.jit(model.init)(jax.random.key(0), batch['inputs'])['params']
  loss_fn = jax.jit(recall_objective.Recall(None).loss_fn(model))

  def loss(targets):
    total, aux = loss_fn(params, dict(batch, targets=targets), None)
    return float(total), float(aux['weight'])

  base, weight = loss(batch['targets'])
  assert weight == 16  # 4 rows x 4 answers
  answer_at = np.argwhere(batch['weights'] > 0)
  other_at = np.argwhere(batch['weights'] == 0)
  changed = np.array(batch['targets'])
  for r, c in other_at[::7]:
    changed[r, c] = (changed[r, c] + 5) % 32
  assert loss(changed)[0] == base
  changed = np.array(batch['targets'])
  r, c = answer_at[0]
  changed[r, c] = (changed[r, c] + 5) % 32
  assert loss(changed)[0] != base
  # The evaluation's loss is the same sum, and it counts the answers predicted exactly.
  logits = jax.jit(model.apply)({'params': params}, batch['inputs'])
  metrics = recall_objective.answer_metrics(logits, batch['targets'], batch['weights'])
  assert metrics['weight'] == weight and np.isclose(metrics['loss'], base, rtol=1e-5)
  hits = (np.argmax(logits, -1) == batch['targets'])[batch['weights'] > 0].sum()
  assert metrics['correct'] == hits


def test_the_model_never_reads_an_answer(tfds_dir):
  # Were answers inputs, a later query could be answered by elimination (the values already
  # given are not its answer). Both the training and the evaluation batches blank them.
  c = recall_config.get_config()
  c.task.update(task_config(tfds_dir))
  c.train.update(batch_size=8, eval_batch_size=8)
  recall = recall_objective.Recall(c)
  data = recall.data('', None)
  train = recall.train_dataset(data, 0, 1)[0]
  evaluation = next(iter(recall.eval_batches(data, 1, 0, 1)))
  rows = data.validation.arrays
  for batch in (train, evaluation):
    tokens = np.concatenate([batch['inputs'][:, :1], batch['targets']], axis=1)
    # The reference: each row's answers are at the positions whose previous target is weighted.
    answer_input = np.zeros(batch['inputs'].shape, bool)
    answer_input[:, 1:] = batch['weights'][:, :-1] > 0
    assert answer_input.sum() == 4 * len(tokens) - (batch['weights'][:, -1] > 0).sum()
    assert (batch['inputs'][answer_input] == recall_objective.BLANK).all()
    np.testing.assert_array_equal(batch['inputs'][~answer_input], tokens[:, :-1][~answer_input])
    assert (batch['targets'][batch['weights'] > 0] > tasks.num_keys(32)).all()  # values
  np.testing.assert_array_equal(evaluation['targets'], rows['tokens'][:8, 1:])


def causal_attention(q_TxD, k_TxD, v_TxE):
  """Softmax attention of each position over itself and the positions before it."""
  t = q_TxD.shape[0]
  scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), q_TxD @ k_TxD.T, -jnp.inf)
  return jax.nn.softmax(scores, axis=-1) @ v_TxE


def lookup_model(tokens_T, vocab: int, beta: float = 50.0, shift: int = 1):
  """Two hand-set attention layers that implement MQAR's lookup (an induction head), as logits.

  The residual stream of a position is [token one-hot (V) | position one-hot (T) | previous
  token one-hot (V)], the last part empty at first.
  Layer 1 (previous-token head): the query of position t is its position, the key of position s
  is position s + 1 (a shift of the position one-hot), so t attends to s = t - 1 alone (beta
  makes the softmax a hard choice); its value is the token, written into the previous-token part.
  Layer 2 (lookup): the query of a query token k is its token, the key of position s its previous
  token, so k attends to the position right after the earlier k: its value. The value read is the
  token there. (Position 0, whose layer-1 head can see only itself, also holds key k1 as its own
  "previous token"; it copies k1, a key, which the unembedding below ignores.)
  Unembedding: the copied token's one-hot onto the value ids only, since answers are values."""
  t = len(tokens_T)
  tok_TxV = jax.nn.one_hot(tokens_T, vocab)
  pos_TxT = jnp.eye(t)
  shift_TxT = jnp.eye(t, k=shift)                         # position s -> one-hot of s + 1
  prev_TxV = causal_attention(beta * pos_TxT, pos_TxT @ shift_TxT, tok_TxV)
  copied_TxV = causal_attention(beta * tok_TxV, prev_TxV, tok_TxV)
  is_value = jnp.arange(vocab) > tasks.num_keys(vocab)
  return copied_TxV * is_value


def test_hand_set_attention_solves_mqar_exactly():
  vocab, seq_len = 32, 48
  tokens, answers = tasks.generate('mqar', vocab, seq_len, 8, 8, num=20, seed=5)
  batch = recall_objective.as_recall_batch({'tokens': tokens,
                                            'weights': answers.astype(np.float32),
                                            'valid': np.ones(20, np.float32)})
  inputs, targets, weights = batch['inputs'], batch['targets'], batch['weights']
  assert (inputs[:, 1:][weights[:, :-1] > 0] == recall_objective.BLANK).all()
  logits = jax.jit(jax.vmap(lambda x: lookup_model(x, vocab)))(inputs)
  metrics = recall_objective.answer_metrics(logits, targets, weights)
  assert metrics['weight'] == 20 * 8 and metrics['correct'] == metrics['weight']
  # A control: without the previous-token head (layer 1 attends to each position itself), the
  # lookup finds the earlier key and copies the key, not its value: no value gets weight (only
  # the softmax's e^-beta leaks, which argmax would still pick out of all-zero logits).
  broken = jax.jit(jax.vmap(lambda x: lookup_model(x, vocab, shift=0)))(inputs)
  at_answers = weights > 0
  assert np.max(np.asarray(broken)[at_answers]) < 1e-6
  answer_weight = np.take_along_axis(np.asarray(logits), targets[..., None], -1)[..., 0]
  assert np.min(answer_weight[at_answers]) > 0.4


def tiny_sweep(tfds_dir):
  c = recall_config.get_config()
  c.task.update(vocab=16, num_train=64, num_test=16, tfds_data_dir=tfds_dir)
  c.sweep.update(patterns=('attn*1', 'mamba*1'), widths=(16,), num_pairs=(2,), seq_lens=(16,))
  c.train.update(num_steps=4, batch_size=8, warmup_steps=1, steps_per_call=4, log_every=4,
                 checkpoint_every=4, eval_batch_size=16, peak_flops=1e11)
  return c


@pytest.mark.slow
def test_sweep_shards_skips_and_summarizes(tfds_dir, tmp_path, capfd):
  config, workdir = tiny_sweep(tfds_dir), str(tmp_path / 'sweep')
  points = recall_sweep.grid(config)
  assert [(p.pattern, p.d_model, p.num_pairs) for p in points] == [('attn*1', 16, 2),
                                                                    ('mamba*1', 16, 2)]
  assert points[1].config.task.num_pairs == 2 and points[1].config.data.seq_len == 16
  config.sweep.num_pairs = (2, 3)  # a difficulty is (pairs, length): one point each
  assert [p.name for p in recall_sweep.grid(config)] == [
      'attnx1_d16_n2_l16', 'attnx1_d16_n3_l16', 'mambax1_d16_n2_l16', 'mambax1_d16_n3_l16']
  config.sweep.num_pairs = (2,)
  # Shard 1 of 2 runs the second point; the grid is incomplete, so no summary yet.
  rows = recall_sweep.sweep(config, workdir, shard=(1, 2))
  assert sorted(rows) == sorted(p.name for p in points[1::2])
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  capfd.readouterr()
  rows = recall_sweep.sweep(config, workdir)  # the whole grid: the finished runs are skipped
  assert '2 runs in the grid, 2 in shard 0/1, 1 to run' in capfd.readouterr().err
  attn, mamba = rows[points[0].name], rows[points[1].name]
  assert attn['state_size'] == 0 and attn['params'] > 0 and attn['answers'] == 16 * 2
  # Mamba's state: Din x N for the scan plus Din x (d_conv - 1) for the convolution.
  m = config.model.mamba
  assert mamba['state_size'] == 2 * 16 * m.d_state + 2 * 16 * (m.d_conv - 1)
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  entry = summary['patterns']['attn*1']['pairs2_len16']
  assert entry['accuracy'] == {'16': attn['accuracy']}
  assert entry['smallest_width'] == (16 if attn['accuracy'] >= 0.99 else None)
  assert os.path.getsize(os.path.join(workdir, 'recall.png')) > 5_000
  assert os.path.exists(os.path.join(workdir, 'state.png'))


def test_summary_takes_the_smallest_width_that_reaches_the_target():
  runs = [dict(pattern='p', num_pairs=4, seq_len=64, d_model=d, accuracy=a, wall_s=1.0)
          for d, a in ((64, 1.0), (16, 0.5), (32, 0.995))]
  summary = recall_sweep.summarize(runs, 0.99)
  assert summary['patterns']['p']['pairs4_len64']['smallest_width'] == 32
  assert recall_sweep.summarize(runs[1:2], 0.99)['patterns']['p']['pairs4_len64'][
      'smallest_width'] is None


def test_state_size_counts_the_recurrent_mixers_only():
  def size(pattern):
    return recall_sweep.state_size(tiny(vocab_size=32, pattern=pattern))
  mamba = 2 * 32 * 16 + 2 * 32 * 3          # Din x N + Din x (d_conv - 1), Din = 2 x 32
  mamba2 = 2 * 32 * 128 + (2 * 32 + 2 * 128) * 3
  assert size('attn*2') == 0 and size('mamba,attn') == mamba and size('mamba*2') == 2 * mamba
  assert size('mamba2,attn') == mamba2
