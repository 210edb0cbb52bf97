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
from model.config import ConfigError
from train import optim, step as step_lib
from train.restore import load_run
from train.checkpoint import CheckpointError, NonFiniteError
from train.data import DataError
from train.loop import Run, train_and_evaluate
from train.mesh import MeshError
from train.metric_writer import MetricWriter
from train.workdir import RunError
from tests.conftest import SHAKESPEARE, run_config, tiny


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
  seen = []

  def embedding_norm(params, step):  # an evaluator: its metrics join each evaluation's row
    seen.append(step)
    return {'embedding_norm': float(jnp.linalg.norm(params['token_embedding']))}

  final = train_and_evaluate(run_config(tfds_dir), workdir, evaluators=[embedding_norm])
  rows = read_metrics(workdir)
  assert seen == [20, 40] and [r['step'] for r in rows if 'embedding_norm' in r] == [20, 40]
  np.testing.assert_allclose(final['embedding_norm'], np.linalg.norm(
      np.asarray(load_run(workdir).params['token_embedding'])), rtol=1e-5)  # the final params
  train_losses = [r['train_loss'] for r in rows if 'train_loss' in r]
  assert [r['step'] for r in rows if 'train_loss' in r] == [10, 20, 30, 40]
  assert train_losses[-1] < train_losses[0] - 0.5          # from ~4.1 (uniform) downwards
  val = [r for r in rows if 'val_loss' in r]
  assert [r['step'] for r in val] == [20, 40] and val[-1]['val_loss'] < np.log(65) - 0.5
  assert final['val_loss'] == val[-1]['val_loss'] and final['val_tokens'] > 100_000  # whole split
  # MFU: the model's training FLOPs per token over the config's peak (1e11 FLOP/s). By hand:
  # N = 2 x (4 x 32 x 32 attention + 3 x 32 x 64 SwiGLU + 2 x 32 norms) + 32 = 20,640, so
  # 6 x (N + 32 x 65 head) + 2 layers x 12 x 32 keys x 4 heads x 8 = 160,896.
  assert rows[-2]['mfu'] == pytest.approx(160_896 * rows[-2]['tokens_per_s'] / 1e11)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '40']
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['vocab_size'] == 65


class Preempted(Exception):
  """Stands in for a kill: the process dies between two checkpoints."""


def train_until_killed(config, workdir, step, monkeypatch):
  """Trains in `workdir` and dies right after writing the metrics row of `step`."""
  write = MetricWriter.write

  def write_then_die(self, s, metrics):
    write(self, s, metrics)
    if s == step:
      raise Preempted

  monkeypatch.setattr(MetricWriter, 'write', write_then_die)
  with pytest.raises(Preempted):
    train_and_evaluate(config, workdir)
  monkeypatch.undo()


def test_resumed_run_equals_uninterrupted_run(tfds_dir, tmp_path, monkeypatch):
  config = run_config(tfds_dir, train=dict(num_steps=40, checkpoint_every=20, eval_every=0,
                                           log_every=5, steps_per_call=5))
  whole = str(tmp_path / 'whole')
  train_and_evaluate(config, whole)

  split = str(tmp_path / 'split')
  train_until_killed(config, split, 30, monkeypatch)
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
  # A constant schedule: extending the run keeps the learning rate of its steps taken.
  config.train.update(num_steps=40, lr=1e12, grad_clip=0.0, warmup_steps=0,
                      schedule='constant')
  with pytest.raises(NonFiniteError, match=r'loss became (nan|inf) at step 2\d.*step 20, '
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


def tensorboard_scalars(workdir, tag):
  """(step, value) of every `tag` event in DIR/tensorboard, read from the TFRecord framing of the
  event files (8-byte length, 4-byte CRC, the Event proto, 4-byte CRC)."""
  from tensorboardX.proto import event_pb2
  points = []
  tb = os.path.join(workdir, 'tensorboard')
  for name in sorted(os.listdir(tb)):
    data = open(os.path.join(tb, name), 'rb').read()
    pos = 0
    while pos < len(data):
      length = int.from_bytes(data[pos:pos + 8], 'little')
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      points += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
  return points


def test_resumed_runs_tensorboard_holds_each_step_once(tfds_dir, tmp_path, monkeypatch):
  config = run_config(tfds_dir, train=dict(num_steps=40, checkpoint_every=20, eval_every=0))
  workdir = str(tmp_path / 'run')
  train_until_killed(config, workdir, 30, monkeypatch)
  train_and_evaluate(config, workdir)
  rows = [(r['step'], r['train_loss']) for r in read_metrics(workdir) if 'train_loss' in r]
  assert [s for s, _ in rows] == [10, 20, 30, 40]
  np.testing.assert_allclose(tensorboard_scalars(workdir, 'train_loss'), rows, rtol=1e-6)


def inf_update_at(step_index):
  """An optimizer step that makes every update infinite at the given step (0-based): the loss
  of that step is still finite (it is computed before the update), its parameters are not."""
  def init(params):
    return optax.ScaleByScheduleState(jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    scale = jnp.where(state.count == step_index, jnp.inf, 1.0)
    return jax.tree.map(lambda u: u * scale, updates), optax.ScaleByScheduleState(state.count + 1)
  return optax.GradientTransformation(init, update)


def test_a_non_finite_update_on_a_save_step_is_never_saved(tfds_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  make_optimizer = optim.make_optimizer
  monkeypatch.setattr(optim, 'make_optimizer',
                      lambda tc, **kw: optax.chain(make_optimizer(tc, **kw), inf_update_at(19)))
  config = run_config(tfds_dir, train=dict(num_steps=40, checkpoint_every=10, eval_every=0))
  with pytest.raises(NonFiniteError, match=r'not finite at step 20, so they were not saved. The '
                                           r'last good checkpoint, step 10, is intact'):
    train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10']


def snapshot(workdir):
  return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
          for d, _, files in os.walk(workdir) for f in files}


def test_resuming_with_other_data_is_refused_naming_the_fields(tfds_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  config = run_config(tfds_dir, train=dict(num_steps=10, eval_every=0, checkpoint_every=10))
  train_and_evaluate(config, workdir)
  before = snapshot(workdir)
  other = tmp_path / 'other.txt'
  other.write_text(open(config.data.path).read()[:200_000])
  for section, change, message in [
      ('data', dict(path=str(other)), r"data.path: '.*input.txt' -> '.*other.txt'"),
      ('data', dict(seq_len=16), r'data.seq_len: 32 -> 16'),
      ('train', dict(batch_size=16), r'train.batch_size: 8 -> 16'),
      ('train', dict(seed=1), r'train.seed: 0 -> 1')]:
    with pytest.raises(RunError, match=message + r'.*--init_from='):
      train_and_evaluate(run_config(tfds_dir, **{section: change}), workdir)
  assert snapshot(workdir) == before


def test_resuming_on_a_corpus_edited_in_place_is_refused(tfds_dir, tmp_path):
  corpus = tmp_path / 'corpus' / 'text.txt'
  corpus.parent.mkdir()
  text = open(SHAKESPEARE).read()[:100_000]
  corpus.write_text(text)
  config = run_config(tfds_dir, data=dict(path=str(corpus.parent)),
                      train=dict(num_steps=10, eval_every=0, checkpoint_every=10))
  workdir = str(tmp_path / 'run')
  train_and_evaluate(config, workdir)
  train_and_evaluate(config, workdir)  # unchanged: resumes (a finished run reports again)
  mtime = os.path.getmtime(corpus)
  corpus.write_text(text.replace('the', 'THE'))  # same size, same name, same time
  os.utime(corpus, (mtime, mtime))
  before = snapshot(workdir)
  with pytest.raises(DataError, match=r'corpus at data.path=.* changed since this run tokenized '
                                      r'it \(1 file\(s\) differ: text.txt\).*new --workdir'):
    train_and_evaluate(config, workdir)
  assert snapshot(workdir) == before


def test_a_refused_config_leaves_the_workdir_as_it_found_it(tfds_dir, tmp_path):
  fresh = str(tmp_path / 'fresh')
  for sections, error in [(dict(model=dict(position='xpos')), ConfigError),
                          (dict(mesh=dict(data=3)), MeshError),
                          (dict(train=dict(log_every=0)), ConfigError),
                          (dict(model=dict(vocab_size=10)), RunError)]:  # below the tokenizer's
    with pytest.raises(error):
      train_and_evaluate(run_config(tfds_dir, **sections), fresh)
    assert not os.path.exists(fresh)


def test_init_from_starts_from_another_runs_parameters_on_other_data(tfds_dir, tmp_path):
  base_dir, tuned = str(tmp_path / 'base'), str(tmp_path / 'tuned')
  train_and_evaluate(run_config(tfds_dir, train=dict(num_steps=10, eval_every=0)), base_dir)
  before = snapshot(base_dir)
  other = tmp_path / 'other.txt'
  other.write_text(open(SHAKESPEARE).read()[-300_000:])
  # lr 0: the tuned run's parameters stay those it started from.
  config = run_config(tfds_dir, data=dict(path=str(other)),
                      train=dict(num_steps=10, eval_every=0, lr=0.0, min_lr=0.0,
                                 init_from=base_dir))
  train_and_evaluate(config, tuned)
  for a, b in zip(jax.tree.leaves(load_run(base_dir).params),
                  jax.tree.leaves(load_run(tuned).params)):
    np.testing.assert_array_equal(a, b)
  assert snapshot(base_dir) == before  # only read
  assert json.load(open(os.path.join(tuned, 'config.json')))['train']['init_from'] == base_dir
  assert open(os.path.join(tuned, 'tokenizer', 'tokenizer.json')).read() == open(
      os.path.join(base_dir, 'tokenizer', 'tokenizer.json')).read()

  with pytest.raises(RunError, match=r'init_from=.* another model shape or tokenizer.*'
                                     r'model.d_model: 32 -> 64'):
    train_and_evaluate(run_config(tfds_dir, model=dict(d_model=64),
                                  train=dict(init_from=base_dir)), str(tmp_path / 'wide'))
  with pytest.raises(RunError, match=r"data.tokenizer: 'char' -> 'byte'"):
    train_and_evaluate(run_config(tfds_dir, data=dict(tokenizer='byte'),
                                  train=dict(init_from=base_dir)), str(tmp_path / 'bytes'))


@pytest.mark.slow
def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(tfds_dir, tmp_path, capsys):
  # A constant schedule, so that extending num_steps from 40 to 60 changes no learning rate.
  config = run_config(tfds_dir, train=dict(num_steps=40, checkpoint_every=20, eval_every=0,
                                           schedule='constant'))
  whole, workdir = str(tmp_path / 'whole'), str(tmp_path / 'run')
  train_and_evaluate(config, whole)
  train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'checkpoints', '40', 'params', '_METADATA'), 'w') as f:
    f.write('{"tree_metadata": ')  # truncated
  config.train.num_steps = 60
  train_and_evaluate(config, workdir)  # resumes at 20, redoes 21..40, goes on to 60
  assert 'checkpoint 40 cannot be read' in capsys.readouterr().err
  assert os.listdir(os.path.join(workdir, 'checkpoints_unreadable')) == ['40']
  train_and_evaluate(config, whole)
  a = [(r['step'], r['train_loss']) for r in read_metrics(whole) if 'train_loss' in r]
  assert a == [(r['step'], r['train_loss']) for r in read_metrics(workdir) if 'train_loss' in r]

  for step in os.listdir(os.path.join(workdir, 'checkpoints')):
    if step.isdigit():
      os.remove(os.path.join(workdir, 'checkpoints', step, 'data', 'metadata'))
  with pytest.raises(CheckpointError, match=r'no checkpoint in .* can be restored: step 60 fails'
                                            r'.* delete .*checkpoints to train from scratch'):
    train_and_evaluate(config, workdir)


def test_a_split_shorter_than_one_sequence_is_refused_at_start_up_naming_it(tfds_dir, tmp_path):
  text = open(SHAKESPEARE).read()
  workdir = str(tmp_path / 'run')
  for chars, fraction, split in [(20, 0.1, 'the training split of 18 tokens'),
                                 (3000, 0.005, 'the validation split of 15 tokens')]:
    corpus = tmp_path / f'{chars}.txt'
    corpus.write_text(text[:chars])
    with pytest.raises(DataError, match=split + r' is shorter than one sequence of '
                                              r'data.seq_len \+ 1 = 33'):
      train_and_evaluate(run_config(tfds_dir, data=dict(path=str(corpus), val_fraction=fraction)),
                         workdir)
    assert not os.path.exists(workdir)
  # The corrected command then runs there.
  train_and_evaluate(run_config(tfds_dir, train=dict(num_steps=10, eval_every=0)), workdir)


def test_the_last_checkpoint_is_saved_before_the_final_evaluation(tfds_dir, tmp_path,
                                                                   monkeypatch):
  workdir = str(tmp_path / 'run')
  config = run_config(tfds_dir, train=dict(num_steps=20, checkpoint_every=10, eval_every=0))

  def failing(self, max_batches):
    raise RuntimeError('the evaluation failed')

  monkeypatch.setattr(Run, 'evaluate', failing)
  with pytest.raises(RuntimeError, match='the evaluation failed'):
    train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10', '20']
  monkeypatch.undo()
  final = train_and_evaluate(config, workdir)  # nothing left to train: only the evaluation
  assert final['step'] == 20 and final['val_tokens'] > 100_000


@pytest.mark.slow
def test_resuming_with_another_num_steps_is_refused_where_it_changes_the_schedule(
    tfds_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  config = run_config(tfds_dir, train=dict(num_steps=10, checkpoint_every=10, eval_every=0))
  train_and_evaluate(config, workdir)  # cosine, warmup 5: steps 5..9 decay over 10 steps
  before = snapshot(workdir)
  for steps in (20, 8):
    config.train.num_steps = steps
    with pytest.raises(RunError, match=rf'train.num_steps: 10 -> {steps} .*--init_from='):
      train_and_evaluate(config, workdir)
  assert snapshot(workdir) == before
  config.train.num_steps = 10  # the finished run, resumed as it was: evaluated again
  assert train_and_evaluate(config, workdir)['step'] == 10
  # Killed while still warming up (step 10 of 20 warmup steps): nothing has decayed yet.
  early = str(tmp_path / 'early')
  config.train.update(num_steps=30, checkpoint_every=5, warmup_steps=20)
  train_until_killed(config, early, 10, monkeypatch)
  config.train.num_steps = 40
  assert train_and_evaluate(config, early)['step'] == 40


@pytest.mark.slow
def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_nothing_behind(tfds_dir,
                                                                                 tmp_path):
  quick = dict(num_steps=10, checkpoint_every=10, eval_every=0)
  damaged = str(tmp_path / 'damaged')
  train_and_evaluate(run_config(tfds_dir, train=quick), damaged)
  with open(os.path.join(damaged, 'checkpoints', '10', 'params', '_METADATA'), 'w') as f:
    f.write('{"tree_metadata": ')  # truncated
  existing = tmp_path / 'existing'
  existing.mkdir()
  (existing / 'notes.txt').write_text('mine')
  refused = [  # NaN at the first steps; a start run whose checkpoint cannot be read
      (dict(train=dict(quick, lr=1e12, grad_clip=0.0, warmup_steps=0)), NonFiniteError),
      (dict(train=dict(quick, init_from=damaged)), Exception)]
  listing = lambda: sorted(os.listdir(tmp_path))  # noqa: E731
  for workdir in (str(tmp_path / 'new' / 'run'), str(existing)):
    before = (listing(), sorted(os.listdir(existing)))
    for sections, error in refused:
      with pytest.raises(error):
        train_and_evaluate(run_config(tfds_dir, **sections), workdir)
      assert (listing(), sorted(os.listdir(existing))) == before
    train_and_evaluate(run_config(tfds_dir, train=quick), workdir)  # the corrected command
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['10']
  assert 'notes.txt' in os.listdir(existing)
