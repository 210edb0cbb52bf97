"""The grokking experiment: operation tables, the seeded split, Grokfast, the Fourier measure, the
answer-only forward pass, the compiled training call, and a tiny run and sweep end to end."""

import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import experiments.grokking.__main__ as grokking
from experiments.grokking import arithmetic, fourier
from experiments.configs import grokking as grokking_config
from model import LM
from model.config import ConfigError
from train import optim
from train.grokfast import grokfast_ema
from tests.conftest import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_operation_tables():
  p = 7
  tables = {op: arithmetic.table(op, p) for op in arithmetic.MODULAR}

  def lookup(op, x, y):
    a, b, c = tables[op]
    return int(c[(a == x) & (b == y)][0])

  # By hand: 5 + 4 = 9, 2 - 5 = -3, 9 + 12 + 16 = 37 and 3 / 5 = 3 * 3 (5 * 3 = 15 = 1), mod 7.
  assert [lookup('add', 5, 4), lookup('sub', 2, 5), lookup('x2_xy_y2', 3, 4),
          lookup('div', 3, 5)] == [2, 4, 2, 2]
  for op, (a, b, c) in tables.items():
    assert len(set(zip(a, b))) == len(a) == (p * (p - 1) if op == 'div' else p * p), op
  (a, b, c), (a2, b2, c2) = tables['add'], tables['sub']
  assert ((c - b) % p == a).all() and ((c2 + b2) % p == a2).all()
  a, b, c = tables['div']
  assert (b != 0).all() and (c * b % p == a).all()
  a, b, c = tables['x2_xy_y2']
  square = c.reshape(p, p)
  assert (square == square.T).all() and (square[:, 0] == np.arange(p) ** 2 % p).all()
  # S5: row i of `perms` is element i; (x o y)(k) = x(y(k)), the identity is element 0.
  perms = arithmetic.permutations()
  a, b, c = arithmetic.table('s5', 0)
  assert perms.shape == (120, 5) and len(a) == 120 ** 2
  for i in np.random.default_rng(0).choice(len(a), 50, replace=False):
    assert list(perms[c[i]]) == [perms[a[i]][perms[b[i]][k]] for k in range(5)]
  compose = c.reshape(120, 120)
  assert (compose[0] == np.arange(120)).all() and (compose[:, 0] == np.arange(120)).all()
  assert (compose != compose.T).any()  # not commutative
  x, y, z = 17, 63, 101
  assert compose[compose[x, y], z] == compose[x, compose[y, z]]  # associative
  with pytest.raises(ConfigError, match='task.prime=8 is not an odd prime'):
    arithmetic.table('add', 8)
  with pytest.raises(ConfigError, match="task.operation='mul' is not known"):
    arithmetic.table('mul', 7)


def task_config(tmp_path, **kw):
  c = dict(operation='add', prime=11, train_fraction=0.3, seed=0, tfds_data_dir=str(tmp_path))
  c.update(kw)
  return ml_collections.ConfigDict(c)


def pairs(split):
  return {(int(a), int(b)) for a, b, _ in split['inputs']}


def test_the_split_is_seeded_disjoint_and_complete(tmp_path):
  task = arithmetic.load(task_config(tmp_path))
  train, val = pairs(task.train), pairs(task.validation)
  assert len(train) == round(0.3 * 121) and not train & val
  assert train | val == set(itertools.product(range(11), range(11)))
  for split in (task.train, task.validation):
    a, b, eq = split['inputs'].T
    assert (eq == 11).all() and (split['targets'][:, 0] == (a + b) % 11).all()
  assert task.vocab_size == 12
  assert pairs(arithmetic.load(task_config(tmp_path)).train) == train       # same seed
  assert pairs(arithmetic.load(task_config(tmp_path, seed=1)).train) != train


def test_grokfast_equals_its_formula():
  """alpha 0.5, lamb 2: h0 = g0, h_t = (h_{t-1} + g_t) / 2, output g_t + 2 h_t."""
  f = grokfast_ema(alpha=0.5, lamb=2.0)
  grads = [{'w': jnp.array([1.0, 2.0])}, {'w': jnp.array([3.0, -1.0])},
           {'w': jnp.array([0.0, 4.0])}]
  expected = [[3.0, 6.0],     # h = [1, 2]
              [7.0, 0.0],     # h = [2, 0.5]
              [2.0, 8.5]]     # h = [1, 2.25]
  state = f.init(grads[0])
  update = jax.jit(f.update)
  for g, want in zip(grads, expected):
    out, state = update(g, state)
    np.testing.assert_allclose(out['w'], want)
  with pytest.raises(ValueError, match='alpha'):
    grokfast_ema(alpha=1.0)
  # Inside the optimizer chain: clip -> Grokfast -> AdamW. With lamb 0 it is the identity.
  tc = grokking_config.get_config().train
  params = {'w': jnp.ones((2, 2))}
  g = {'w': jnp.array([[0.1, -0.2], [0.3, 0.0]])}
  plain, filtered = optim.make_optimizer(tc), optim.make_optimizer(tc, grokfast_ema(0.9, 0.0))
  np.testing.assert_allclose(plain.update(g, plain.init(params), params)[0]['w'],
                             filtered.update(g, filtered.init(params), params)[0]['w'])


def test_fourier_spectrum_finds_the_frequencies_of_an_embedding():
  p = 13
  x = np.arange(p)[:, None]
  rng = np.random.default_rng(0)
  basis = fourier.basis(p)
  np.testing.assert_allclose(basis @ basis.T, np.eye(p), atol=1e-5)
  # Two frequencies, 3 strong and 5 weaker, in random directions of a width-8 embedding.
  embedding = (np.cos(2 * np.pi * 3 * x / p) * rng.normal(size=8) * 2
               + np.sin(2 * np.pi * 5 * x / p) * rng.normal(size=8) + 0.5)  # + a constant
  spectrum = np.asarray(fourier.spectrum(embedding, basis))
  assert spectrum.shape == (6,) and np.isclose(spectrum.sum(), 1.0)
  assert fourier.key_frequencies(spectrum) == [3, 5]
  assert spectrum[2] > spectrum[4] > 0.1 and spectrum[[0, 1, 3, 5]].max() < 1e-6
  assert float(fourier.gini(jnp.ones(6))) == pytest.approx(0.0, abs=1e-6)
  assert float(fourier.gini(jnp.eye(6)[0])) == pytest.approx(5 / 6)
  noise = rng.normal(size=(p, 8))
  assert fourier.sparsity(embedding, basis) > 0.6 > 0.3 > fourier.sparsity(noise, basis)


def test_last_only_equals_the_last_position_of_the_full_forward():
  """Unscanned, the final layer's attention queries and feed-forward run on the last position
  only; scanned, the stack's output is sliced. Both must give the full forward pass's last
  logits, also with a sliding window (shorter than the row), grouped-query heads and ALiBi, and
  with the elementwise attention the grokking configs use."""
  models = [LM(tiny(pattern='attn*2', scan_layers=scan, norm='none', activation='relu',
                    use_bias=True, position='learned')) for scan in (False, True)]
  models += [LM(tiny(pattern='attn*2', attention_window=3, num_kv_heads=2, position=position,
                    attention_impl=impl))
             for position in ('rope', 'alibi') for impl in ('xla', 'elementwise')]
  tokens = jax.random.randint(jax.random.key(1), (4, 5), 0, 61)

  @jax.jit
  def full_and_last(rng):
    out = []
    for model in models:
      variables = model.init(rng, tokens)
      out.append((model.apply(variables, tokens), model.apply(variables, tokens, last_only=True)))
    return out

  for full, last in full_and_last(jax.random.key(0)):
    assert last.shape == (4, 1, 61)
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-5)


def tiny_config(tmp_path, **train):
  c = grokking_config.get_config()
  c.task.update(prime=11, train_fraction=0.5, tfds_data_dir=str(tmp_path / 'tfds'))
  c.model.update(d_model=32, d_ff=64, init_std=32 ** -0.5)
  c.train.update(lr=1e-2, num_steps=150, eval_every=10, steps_per_call=50, stop_after_grok=1.0)
  c.train.update(train)
  return c


def test_a_compiled_call_equals_single_steps(tmp_path):
  """make_call's scans, with the splits closed over, against single steps and evaluations."""
  config = tiny_config(tmp_path)
  config.grokfast.enabled = True
  setup = grokking.build(config)
  train = jax.device_put(setup.task.train)
  val = jax.device_put(setup.task.validation)
  single_step, evaluate = jax.jit(setup.step), jax.jit(setup.evaluate)
  expected_state, expected = setup.state, []
  for _ in range(2):
    for _ in range(2):
      expected_state, _ = single_step(expected_state, train)
    expected.append(evaluate(expected_state.params, train, val))
  state, metrics = grokking.make_call(setup.step, setup.evaluate, eval_every=2)(
      setup.state, train, val, 2)  # last: the call donates the state it is given
  assert int(state.step) == 4 and set(metrics) == set(expected[0])
  for k in metrics:
    np.testing.assert_allclose(metrics[k], [e[k] for e in expected], rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected_state.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_first_step_is_the_first_logged_step_at_the_threshold():
  rows = [{'step': 10, 'acc': 0.5}, {'step': 20, 'acc': 0.99}, {'step': 30, 'acc': 0.98},
          {'step': 40, 'acc': 1.0}]
  assert grokking.first_step(rows, 'acc') == 20
  assert grokking.first_step(rows, 'acc', threshold=0.995) == 40
  assert grokking.first_step(rows[:1], 'acc') is None


@pytest.mark.slow
def test_a_sweep_of_tiny_runs_writes_every_output(tmp_path):
  config = tiny_config(tmp_path)
  config.sweep.update(train_fractions=(0.5, 0.8), weight_decays=(1.0,))
  results = grokking.sweep(config, str(tmp_path / 'sweep'))
  assert [(r['train_fraction'], r['weight_decay']) for r in results] == [(0.5, 1.0), (0.8, 1.0)]
  assert os.path.getsize(tmp_path / 'sweep' / 'sweep.png') > 1000
  assert json.load(open(tmp_path / 'sweep' / 'sweep.json')) == results

  workdir = tmp_path / 'sweep' / 'wd1_frac0.5'
  with open(workdir / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  summary = json.load(open(workdir / 'summary.json'))
  assert [r['step'] for r in rows][:3] == [10, 20, 30] and rows[-1]['step'] == summary['final_step']
  assert set(rows[0]) == {'step', 'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy',
                          'embedding_fourier_gini'}
  assert rows[-1]['train_accuracy'] == 1.0 and rows[-1]['train_loss'] < rows[0]['train_loss'] / 5
  memorized = [r['step'] for r in rows if r['train_accuracy'] >= 0.99]
  assert summary['memorize_step'] in memorized and all(
      r['train_accuracy'] < 0.99 for r in rows if r['step'] < summary['memorize_step'])
  assert summary['final_train_accuracy'] == 1.0 and summary['wall_s'] > 0

  # Run again with one fraction changed: the unchanged run is kept (its files untouched), the
  # changed one is trained; a run whose config changed in place is made again.
  kept = os.path.getmtime(workdir / 'metrics.jsonl')
  config.sweep.update(train_fractions=(0.5, 0.9))
  again = grokking.sweep(config, str(tmp_path / 'sweep'))
  assert again[0] == results[0] and os.path.getmtime(workdir / 'metrics.jsonl') == kept
  assert again[1]['train_fraction'] == 0.9 and (tmp_path / 'sweep' / 'wd1_frac0.9').is_dir()
  config.train.lr *= 2
  assert grokking.sweep(config, str(tmp_path / 'sweep'))[0]['wall_s'] != results[0]['wall_s']
  assert summary['key_frequencies'] and len(summary['fourier_spectrum']) == 5
  for name in ('grokking.png', 'fourier.png', 'config.json'):
    assert os.path.getsize(workdir / name) > 1000, name


def test_bad_config_gets_one_clear_line(tmp_path):
  with pytest.raises(ConfigError, match='must be positive multiples of train.eval_every=10'):
    grokking.train(tiny_config(tmp_path, num_steps=155), str(tmp_path / 'run'))
  # An unknown key with the default config (no --config flag) is one line, not a traceback.
  result = subprocess.run([sys.executable, '-m', 'experiments.grokking', f'--workdir={tmp_path}',
                           '--config.task.primes=5'], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert "--config.task.primes: config.task has no key 'primes'" in result.stderr
