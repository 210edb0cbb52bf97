"""Distillation (train/objectives/distill.py): the KD loss against numpy, the frozen teacher
(unchanged, never in the student's checkpoint, pinned), exact resume, refusals."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from model import LM
from model.config import ConfigError
from train import checkpoint as ckpt_lib, objectives
from train.checkpoint import CheckpointError
from train.loop import Run, train_and_evaluate
from train.objectives.distill import kd_losses
from train.restore import load_run
from tests.conftest import run_config, tiny
from tests.test_train import read_metrics, train_until_killed


def softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def reference_kd(student, teacher, temperature, top_k):
  """T^2 KL(teacher_T || student_T) per position, in float64; over the teacher's top k, both
  renormalised there."""
  student, teacher = student.astype(np.float64), teacher.astype(np.float64)
  if top_k:
    keep = np.argsort(-teacher, axis=-1)[..., :top_k]
    student = np.take_along_axis(student, keep, axis=-1)
    teacher = np.take_along_axis(teacher, keep, axis=-1)
  p, q = softmax(teacher / temperature), softmax(student / temperature)
  return temperature ** 2 * np.sum(p * (np.log(p) - np.log(q)), axis=-1)


@pytest.mark.parametrize('temperature, top_k', [(1.0, 0), (2.5, 0), (2.0, 3)])
def test_kd_loss_equals_numpy_reference(temperature, top_k):
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(0, 3, (2, 5, 11)), rng.normal(0, 3, (2, 5, 11))
  got = kd_losses(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                  temperature, top_k)
  np.testing.assert_allclose(got, reference_kd(student, teacher, temperature, top_k),
                             rtol=1e-4, atol=1e-6)


def objective_config(**distill):
  c = run_config('', train=dict(objective='distill'))
  c.distill.update(dict(dict(teacher='teacher-run'), **distill))
  return c


def test_the_loss_mixes_kd_and_cross_entropy_and_kd_is_zero_for_the_teacher_itself():
  """loss = alpha T^2 KL + (1 - alpha) CE per token, against numpy on the two models' logits."""
  student_model, teacher_model = LM(tiny(vocab_size=13)), LM(tiny(vocab_size=13, d_model=48))
  tokens = np.random.default_rng(1).integers(0, 13, (3, 9))
  batch = {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:]),
           'weights': jnp.asarray((np.arange(8) % 3 > 0)[None].repeat(3, 0), jnp.float32)}
  student = jax.jit(student_model.init)(jax.random.key(0), batch['inputs'])['params']
  teacher = jax.jit(teacher_model.init)(jax.random.key(1), batch['inputs'])['params']
  objective = objectives.make(objective_config(temperature=2.0, alpha=0.3, top_k=4))
  objective.teacher_model = teacher_model
  loss, aux = jax.jit(objective.loss_fn(student_model))(student, batch, None,
                                                        {'teacher': teacher})

  s = np.asarray(jax.jit(student_model.apply)({'params': student}, batch['inputs']), np.float64)
  t = np.asarray(jax.jit(teacher_model.apply)({'params': teacher}, batch['inputs']), np.float64)
  w = np.asarray(batch['weights'])
  ce = -np.log(np.take_along_axis(softmax(s), tokens[:, 1:, None], axis=-1)[..., 0])
  kd = reference_kd(s, t, 2.0, 4)
  np.testing.assert_allclose(aux['sums']['kd_loss'], (kd * w).sum(), rtol=1e-4)
  np.testing.assert_allclose(aux['sums']['ce_loss'], (ce * w).sum(), rtol=1e-4)
  np.testing.assert_allclose(loss, ((0.3 * kd + 0.7 * ce) * w).sum(), rtol=1e-4)
  assert aux['weight'] == w.sum()

  objective.teacher_model = student_model  # the student distilled from itself: KL 0
  _, aux = jax.jit(objective.loss_fn(student_model))(student, batch, None, {'teacher': student})
  assert abs(float(aux['sums']['kd_loss'])) < 1e-5


@pytest.mark.parametrize('field, value, says', [
    ('temperature', 0.0, 'distill.temperature=0.0 must be > 0'),
    ('alpha', 1.5, 'distill.alpha=1.5 must be in [0, 1]'),
    ('top_k', -1, 'distill.top_k=-1 must be >= 0'),
    ('teacher', '', 'needs distill.teacher')])
def test_bad_distill_values_are_one_error_line(field, value, says):
  with pytest.raises(ConfigError) as e:
    objectives.make(objective_config(**{field: value}))
  assert says in str(e.value) and '\n' not in str(e.value)


def teacher_config(tfds_dir, **train):
  """A small attention teacher, and a shorter validation split for quick final evaluations."""
  return run_config(tfds_dir, data=dict(val_fraction=0.02),
                    model=dict(d_model=48, num_heads=4, d_ff=96),
                    train=dict(dict(num_steps=40, eval_every=0, checkpoint_every=20), **train))


def student_config(tfds_dir, teacher, **sections):
  train = dict(dict(num_steps=40, eval_every=0, checkpoint_every=20, log_every=5,
                    steps_per_call=5, objective='distill'), **sections.pop('train', {}))
  c = run_config(tfds_dir, data=dict(val_fraction=0.02), train=train,
                 distill=dict(dict(teacher=teacher, temperature=2.0, alpha=0.8),
                              **sections.pop('distill', {})))
  for name, values in sections.items():
    c[name].update(values)
  return c


@pytest.fixture(scope='module')
def teacher(tfds_dir, tmp_path_factory):
  """A small attention teacher run's work directory (char-level, 65 characters)."""
  workdir = str(tmp_path_factory.mktemp('distill') / 'teacher')
  train_and_evaluate(teacher_config(tfds_dir, num_steps=10, steps_per_call=10,
                                    checkpoint_every=10), workdir)
  return workdir


@pytest.mark.parametrize('sections, says', [
    (dict(data=dict(tokenizer='byte')), "data.tokenizer: 'char' -> 'byte'"),
    (dict(model=dict(vocab_size=128)), 'has model.vocab_size=65, the student 128')])
def test_a_teacher_of_another_vocabulary_is_refused_in_one_line(tfds_dir, tmp_path, teacher,
                                                                 sections, says):
  student = str(tmp_path / 'student')
  with pytest.raises(ConfigError) as e:
    train_and_evaluate(student_config(tfds_dir, teacher, **sections), student)
  assert says in str(e.value) and '\n' not in str(e.value)
  assert not os.path.exists(student)


def flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


@pytest.mark.slow
def test_distillation_resumes_exactly_with_its_teacher_frozen_pinned_and_unsaved(
    tfds_dir, tmp_path, monkeypatch):
  teacher = str(tmp_path / 'teacher')
  train_and_evaluate(teacher_config(tfds_dir, keep_checkpoints=3, schedule='constant'), teacher)
  config = student_config(tfds_dir, teacher)

  whole = str(tmp_path / 'whole')
  run = Run(config, whole)
  try:
    run.train()
  finally:
    run.close()
  teacher_params = flat(load_run(teacher).params)
  held = flat(run.state.frozen['teacher'])
  assert held.keys() == teacher_params.keys()
  for path, value in teacher_params.items():  # the teacher never moved
    np.testing.assert_array_equal(held[path], value)
  student_shapes = {path: v.shape for path, v in flat(run.state.params).items()}
  saved = ckpt_lib.params_metadata(whole, 40)
  assert {path: tuple(shape) for path, (shape, _) in saved.items()} == student_shapes
  assert student_shapes != {path: v.shape for path, v in teacher_params.items()}
  assert json.load(open(os.path.join(whole, 'config.json')))['distill']['teacher_step'] == 40

  rows = [r for r in read_metrics(whole) if 'train_loss' in r]
  for key in ('train_loss', 'train_kd_loss', 'train_ce_loss'):  # learning from the teacher
    assert rows[-1][key] < rows[0][key] - 0.1, key

  # Killed after step 30 (checkpoint 20); meanwhile the teacher trains on to step 60. The
  # resumed run still reads the teacher at step 40, the step it pinned.
  split = str(tmp_path / 'split')
  train_until_killed(config, split, 30, monkeypatch)
  train_and_evaluate(teacher_config(tfds_dir, keep_checkpoints=3, num_steps=60,
                                    schedule='constant'), teacher)
  train_and_evaluate(config, split)
  a = [(r['step'], r['train_loss'], r['train_kd_loss']) for r in read_metrics(whole)
       if 'train_loss' in r]
  b = [(r['step'], r['train_loss'], r['train_kd_loss']) for r in read_metrics(split)
       if 'train_loss' in r]
  assert len(a) == 8 and a == b

  shutil.rmtree(os.path.join(teacher, 'checkpoints', '40'))  # the pinned teacher is gone
  with pytest.raises(CheckpointError, match='distill.teacher=.*its step 40'):
    train_and_evaluate(config, split)


@pytest.mark.slow
def test_a_mamba_student_learns_from_an_attention_teacher(tfds_dir, tmp_path, teacher):
  student = str(tmp_path / 'student')
  train_and_evaluate(student_config(tfds_dir, teacher, model=dict(pattern='mamba,attn'),
                                    distill=dict(top_k=8)), student)
  rows = [r for r in read_metrics(student) if 'train_loss' in r]
  assert rows[-1]['train_kd_loss'] < rows[0]['train_kd_loss'] / 2
  assert load_run(student).model_cfg.pattern == 'mamba,attn'
