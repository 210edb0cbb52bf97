"""Checkpoints are never trusted blindly (train/checkpoint.py): every array's fingerprint is
recorded at save and checked at every restore, so a step damaged in place is set aside in
training and refused by evaluation and `train.init_from`; the frozen runs a run reads (LoRA's
base) are pinned to the step they began from."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train.checkpoint import CheckpointError, fingerprint
from train.loop import train_and_evaluate
from train.metric_writer import MetricWriter
from train.restore import load_run
from tests.conftest import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['train_loss']) for r in map(json.loads, f) if 'train_loss' in r]


def read_raw(params_dir):
  """The arrays of a checkpoint's params as orbax alone reads them: no checksum is checked."""
  with ocp.StandardCheckpointer() as checkpointer:
    return jax.tree.leaves(checkpointer.restore(params_dir))


def damage(workdir, step, seed=0):
  """Writes 64 random bytes into the largest array file of `step`'s params (its size
  unchanged), at a place where orbax still reads the file, silently, with other values: what a
  disk or a copy can do that the compression does not notice."""
  params = os.path.join(workdir, 'checkpoints', str(step), 'params')
  before = read_raw(params)
  path = largest_array_file(workdir, step)
  original = open(path, 'rb').read()
  rng = np.random.default_rng(seed)
  for _ in range(50):
    damaged = bytearray(original)
    offset = int(rng.integers(0, len(original) - 64))
    damaged[offset:offset + 64] = rng.bytes(64)
    with open(path, 'wb') as f:
      f.write(damaged)
    try:
      after = read_raw(params)
    except Exception:  # noqa: BLE001  orbax noticed (unreadable): try another place
      continue
    if any(not np.array_equal(a, b) for a, b in zip(before, after)):
      assert len(damaged) == len(original)
      return
  raise AssertionError('no silent damage found')


def largest_array_file(workdir, step):
  data = os.path.join(workdir, 'checkpoints', str(step), 'params', 'ocdbt.process_0', 'd')
  return max((os.path.join(data, n) for n in os.listdir(data)), key=os.path.getsize)


@pytest.mark.slow
def test_a_checkpoint_damaged_in_place_is_never_trusted(tfds_dir, tmp_path, capfd):
  config = run_config(tfds_dir, train=dict(num_steps=40, checkpoint_every=20, eval_every=0))
  whole, workdir = str(tmp_path / 'whole'), str(tmp_path / 'run')
  train_and_evaluate(config, whole)
  train_and_evaluate(config, workdir)
  damage(workdir, 40)
  capfd.readouterr()

  # Evaluation and sampling refuse it, naming the earlier step that reads back as saved.
  with pytest.raises(CheckpointError, match=r'^checkpoint 40 is damaged: params/.* read back '
                                            r'other values.*use --step=20'):
    load_run(workdir)
  assert load_run(workdir, 20).step == 20
  result = subprocess.run([sys.executable, '-m', 'eval.sample', f'--workdir={workdir}',
                           '--max_new_tokens=4'], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2 and result.stdout == ''
  error = [line for line in result.stderr.splitlines() if 'TPU' not in line]  # libtpu's noise
  assert len(error) == 1 and error[0].startswith('error: checkpoint 40 is damaged'), error

  # A run started from it is refused in one line, leaving nothing behind.
  tuned = str(tmp_path / 'tuned')
  with pytest.raises(CheckpointError, match=r'train.init_from=.*checkpoint 40 is damaged.*its '
                                            r'step 20 reads back as saved'):
    train_and_evaluate(run_config(tfds_dir, train=dict(init_from=workdir)), tuned)
  assert not os.path.exists(tuned)

  # Training sets it aside, says so in one line, and redoes 21..40 from step 20 exactly.
  capfd.readouterr()
  train_and_evaluate(config, workdir)
  warnings = [line for line in capfd.readouterr().err.splitlines()
              if line.startswith('warning: checkpoint')]
  assert len(warnings) == 1 and warnings[0].startswith('warning: checkpoint 40 is damaged: ')
  assert os.listdir(os.path.join(workdir, 'checkpoints_unreadable')) == ['40']
  assert losses(workdir) == losses(whole)

  # The parameters' metadata damaged (orbax then reads it as None): refused in one line too.
  sharding = os.path.join(workdir, 'checkpoints', '40', 'params', '_sharding')
  with open(sharding, 'r+b') as f:
    intact = f.read()
    f.seek(0)
    f.write(np.random.default_rng(0).bytes(len(intact)))
  with pytest.raises(CheckpointError, match=r'train.init_from=.*checkpoint 40 cannot be read: '
                                            r'its (parameters. )?metadata'):
    train_and_evaluate(run_config(tfds_dir, train=dict(init_from=workdir)), tuned)
  assert not os.path.exists(tuned)
  with open(sharding, 'wb') as f:
    f.write(intact)

  # With every step damaged, evaluation suggests none.
  damage(workdir, 40)
  damage(workdir, 20, seed=1)
  with pytest.raises(CheckpointError, match=r'checkpoint 40 is damaged.*no earlier step reads '
                                            r'back as saved either'):
    load_run(workdir)

  # Damage orbax notices: one clean reason (not the repr of TensorStore's spec), and nothing
  # more when the reads it left unfinished are collected (each an asyncio traceback with that
  # spec: hundreds of lines after the error at exit).
  path = largest_array_file(workdir, 40)
  with open(path, 'r+b') as f:
    for offset in range(0, os.path.getsize(path) - 512, 3000):
      f.seek(offset)
      f.write(np.random.default_rng(offset).bytes(512))
  with pytest.raises(CheckpointError, match=r'^checkpoint 40 cannot be read \(\w+: .*'
                                            r'no earlier step') as refused:
    load_run(workdir)
  assert 'pybind11' not in str(refused.value) and 'TensorStore({' not in str(refused.value)
  result = subprocess.run([sys.executable, '-c', LOAD_FAILING, workdir], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.stderr.splitlines() == ['refused'] * 4, result.stderr[:2000]


# Loads a run whose checkpoints cannot be read four times, then collects the garbage.
LOAD_FAILING = '''
import gc, sys
from train.mesh import prepare_backend
from train.restore import load_run
prepare_backend()  # as every command: no TPU attempt where libtpu is installed
for _ in range(4):
  try:
    load_run(sys.argv[1])
  except Exception as e:
    print('refused', file=sys.stderr)
gc.collect()
'''


def test_a_checkpoint_saved_before_checksums_loads_with_a_warning(tfds_dir, tmp_path, capfd):
  workdir = str(tmp_path / 'run')
  train_and_evaluate(run_config(tfds_dir, train=dict(num_steps=10, checkpoint_every=10,
                                                     eval_every=0)), workdir)
  expected = jax.tree.leaves(load_run(workdir).params)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '10', 'checksums'))
  capfd.readouterr()
  for a, b in zip(expected, jax.tree.leaves(load_run(workdir).params)):
    np.testing.assert_array_equal(a, b)
  assert 'checkpoint 10 in' in capfd.readouterr().err
  assert fingerprint(workdir, 10) == ''


class Killed(Exception):
  """Stands in for a kill right after the metrics row of a given step."""


@pytest.mark.slow
def test_a_lora_run_reads_the_step_of_its_base_it_began_from(tfds_dir, tmp_path, monkeypatch):
  train = dict(num_steps=10, checkpoint_every=5, eval_every=0, log_every=5, steps_per_call=5,
               keep_checkpoints=10)
  base = str(tmp_path / 'base')
  base_train = dict(train, schedule='constant')  # so that it can train on (train.num_steps 20)
  train_and_evaluate(run_config(tfds_dir, train=base_train), base)
  lora = run_config(tfds_dir, lora=dict(rank=2), train=dict(train, init_from=base))
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  train_and_evaluate(lora, whole)

  write = MetricWriter.write

  def write_then_die(self, step, metrics):
    write(self, step, metrics)
    if step == 5:  # after checkpoint 5 (a call's rows follow its checkpoint), before 10
      raise Killed

  monkeypatch.setattr(MetricWriter, 'write', write_then_die)
  with pytest.raises(Killed):
    train_and_evaluate(lora, split)
  monkeypatch.undo()
  saved = json.load(open(os.path.join(split, 'config.json')))['train']
  assert saved['init_from_step'] == 10 and saved['init_from_fingerprint'] == fingerprint(base, 10)

  # The base trains on; the LoRA run resumes on the base's step 10, as it began.
  train_and_evaluate(run_config(tfds_dir, train=dict(base_train, num_steps=20)), base)
  train_and_evaluate(lora, split)
  assert losses(split) == losses(whole)
  base_10 = load_run(base, 10).params
  for a, b in zip(jax.tree.leaves(base_10), jax.tree.leaves(load_run(split).frozen)):
    np.testing.assert_array_equal(a, b)

  # The pinned step gone: evaluation and training refuse, in one line.
  shutil.rmtree(os.path.join(base, 'checkpoints', '10'))
  for attempt in (lambda: load_run(split), lambda: train_and_evaluate(lora, split)):
    with pytest.raises(CheckpointError, match=r'train.init_from=.*base: its step 10, which this '
                                              r'run started from.*is gone'):
      attempt()


def test_a_line_that_is_not_json_is_named_once(tmp_path):
  from train.chat import read_jsonl
  from train.data import DataError
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"prompt": "a}')  # no newline: the string runs to the end
  with pytest.raises(DataError) as refused:
    read_jsonl(str(path), lambda record, where: record)
  assert str(refused.value).endswith('bad.jsonl:1: not valid JSON (Unterminated string starting '
                                     'at: column 12)')
