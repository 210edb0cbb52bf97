"""The training pipeline: optimizer, steps, and the loop with its checkpoints and guards."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from model import LM
from train import optim, step as step_lib
from train.loop import NonFiniteLossError, train_and_evaluate
from train.metric_writer import MetricWriter
from train.workdir import RunError
from tests.conftest import run_config, tiny


def test_weight_decay_skips_norms_biases_and_vectors():
  params = {'dense': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)},
            'norm': {'scale': jnp.ones((2, 4))},  # a scanned norm scale is 2-D but not decayed
            'mixer': {'A_log': jnp.ones((4, 2)), 'D': jnp.ones(4)},
            'token_embedding': jnp.ones((5, 4))}
  mask = optim.decay_mask(params, ('scale', 'bias', 'A_log', 'D'))
  assert mask == {'dense': {'kernel': True, 'bias': False}, 'norm': {'scale': False},
                  'mixer': {'A_log': False, 'D': False}, 'token_embedding': True}


@pytest.mark.parametrize('schedule', ['cosine', 'linear', 'constant'])
def test_schedules_warm_up_then_decay_to_min_lr(schedule):
  tc = ml_collections.ConfigDict(dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, num_steps=100,
                                      schedule=schedule))
  lr = optim.learning_rate_schedule(tc)
  assert float(lr(0)) == 0.0 and np.isclose(float(lr(5)), 5e-4) and np.isclose(float(lr(10)), 1e-3)
  end = 1e-3 if schedule == 'constant' else 1e-4
  assert np.isclose(float(lr(100)), end)
  if schedule == 'cosine':
    assert np.isclose(float(lr(55)), 1e-4 + 0.5 * 9e-4)  # half way down the cosine


def make_state(cfg, tc):
  model = LM(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  opt = optim.make_optimizer(tc)
  return model, opt, step_lib.TrainState(jnp.int32(0), params['params'],
                                         opt.init(params['params']))


def train_cfg(**kw):
  c = dict(lr=1e-3, min_lr=1e-4, warmup_steps=2, num_steps=10, schedule='cosine', b1=0.9,
           b2=0.95, eps=1e-8, weight_decay=0.1, weight_decay_exclude=('scale', 'bias'),
           grad_clip=1.0)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def batch(shape, seed=0, vocab=61):
  tokens = jax.random.randint(jax.random.key(seed), (*shape[:-1], shape[-1] + 1), 0, vocab)
  return {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:]}


def test_gradient_accumulation_equals_the_full_batch():
  cfg, tc = tiny(), train_cfg()
  model, opt, state = make_state(cfg, tc)
  schedule = optim.learning_rate_schedule(tc)
  b = batch((8, 16))
  b['weights'] = jnp.ones((8, 16)).at[:3, :5].set(0.0)  # uneven weights across micro-batches
  full = jax.jit(step_lib.make_train_step(model, opt, schedule, seed=0))
  accum = jax.jit(step_lib.make_train_step(model, opt, schedule, seed=0, grad_accum_steps=4))
  (s1, m1), (s2, m2) = full(state, b), accum(state, b)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-6)
  np.testing.assert_allclose(m1['grad_norm'], m2['grad_norm'], rtol=1e-5)
  for a, c in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, c, atol=1e-6)


def test_multi_step_call_equals_single_steps():
  cfg, tc = tiny(), train_cfg()
  model, opt, state = make_state(cfg, tc)
  step = step_lib.make_train_step(model, opt, optim.learning_rate_schedule(tc), seed=0)
  batches = batch((3, 4, 16))
  multi_state, metrics = jax.jit(step_lib.make_multi_step(step))(state, batches)
  single = jax.jit(step)
  losses = []
  for k in range(3):
    state, m = single(state, jax.tree.map(lambda x: x[k], batches))
    losses.append(m['loss'])
  np.testing.assert_allclose(metrics['loss'], losses, rtol=1e-6)
  assert int(multi_state.step) == 3
  for a, b in zip(jax.tree.leaves(multi_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_training_on_shakespeare_lowers_the_loss_and_writes_its_outputs(tfds_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  final = train_and_evaluate(run_config(tfds_dir), workdir)
  rows = read_metrics(workdir)
  train_losses = [r['train_loss'] for r in rows if 'train_loss' in r]
  assert [r['step'] for r in rows if 'train_loss' in r] == [10, 20, 30, 40]
  assert train_losses[-1] < train_losses[0] - 0.5          # from ~4.1 (uniform) downwards
  val = [r for r in rows if 'val_loss' in r]
  assert [r['step'] for r in val] == [20, 40] and val[-1]['val_loss'] < np.log(65) - 0.5
  assert final['val_loss'] == val[-1]['val_loss'] and final['val_tokens'] > 100_000  # whole split
  assert 'tokens_per_s' in rows[-2] and 0 < rows[-2]['mfu']
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '40']
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['vocab_size'] == 65


class Preempted(Exception):
  """Stands in for a kill: the process dies between two checkpoints."""


def test_resumed_run_equals_uninterrupted_run(tfds_dir, tmp_path, monkeypatch):
  config = run_config(tfds_dir, train=dict(num_steps=40, checkpoint_every=20, eval_every=0,
                                           log_every=5, steps_per_call=5))
  whole = str(tmp_path / 'whole')
  train_and_evaluate(config, whole)

  split = str(tmp_path / 'split')
  write = MetricWriter.write

  def write_then_die(self, step, metrics):
    write(self, step, metrics)
    if step == 30:
      raise Preempted

  monkeypatch.setattr(MetricWriter, 'write', write_then_die)
  with pytest.raises(Preempted):
    train_and_evaluate(config, split)
  monkeypatch.undo()
  assert sorted(os.listdir(os.path.join(split, 'checkpoints'))) == ['20']
  assert read_metrics(split)[-1]['step'] == 30  # logged past the checkpoint, then killed
  final = train_and_evaluate(config, split)   # the same command again resumes from step 20

  a = [(r['step'], r['train_loss']) for r in read_metrics(whole) if 'train_loss' in r]
  b = [(r['step'], r['train_loss']) for r in read_metrics(split) if 'train_loss' in r]
  assert len(a) == 8 and a == b  # bit for bit, rows 25 and 30 replaced by their recomputation
  assert final['step'] == 40


def test_non_finite_loss_stops_with_the_last_good_checkpoint_intact(tfds_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  config = run_config(tfds_dir, train=dict(num_steps=20, checkpoint_every=10, eval_every=0))
  train_and_evaluate(config, workdir)
  before = {f: os.path.getmtime(os.path.join(workdir, 'checkpoints', '20', f))
            for f in os.listdir(os.path.join(workdir, 'checkpoints', '20'))}
  config.train.update(num_steps=40, lr=1e12, grad_clip=0.0, warmup_steps=0)
  with pytest.raises(NonFiniteLossError, match=r'loss became (nan|inf) at step 2\d.*step 20, '
                                              r'is intact'):
    train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '20']
  assert before == {f: os.path.getmtime(os.path.join(workdir, 'checkpoints', '20', f))
                    for f in before}


def test_a_workdir_of_another_model_is_refused_untouched(tfds_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  train_and_evaluate(run_config(tfds_dir, train=dict(num_steps=10, eval_every=0,
                                                     checkpoint_every=10)), workdir)
  snapshot = {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)}
  with pytest.raises(RunError, match=r'model.d_model: 32 -> 64; model.num_heads: 4 -> 8'):
    train_and_evaluate(run_config(tfds_dir, model=dict(d_model=64, num_heads=8)), workdir)
  with pytest.raises(RunError, match=r"data.tokenizer: 'char' -> 'byte'"):
    train_and_evaluate(run_config(tfds_dir, data=dict(tokenizer='byte')), workdir)
  assert snapshot == {p: os.path.getmtime(os.path.join(workdir, p)) for p in os.listdir(workdir)}
