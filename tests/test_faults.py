"""Faults a run must survive, end to end through `python -m train`: kill -9 while a checkpoint is
being written, a second process on the same work directory, SIGTERM (preemption) and SIGINT
(Ctrl-C). Each resumed run's losses equal an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'experiments/configs/shakespeare_char.py'


def train_args(workdir, tfds_dir, steps=60, checkpoint_every=20):
  return ['-m', 'train', f'--config={CONFIG}', f'--workdir={workdir}',
          f'--config.data.tfds_data_dir={tfds_dir}', '--config.model.d_model=32',
          '--config.model.d_ff=64', '--config.model.pattern=attn*2', '--config.data.seq_len=32',
          '--config.train.batch_size=8', f'--config.train.num_steps={steps}',
          '--config.train.steps_per_call=10', '--config.train.log_every=10',
          '--config.train.eval_every=0', f'--config.train.checkpoint_every={checkpoint_every}',
          '--config.train.peak_flops=1e11']


def run(args, check=True):
  result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  if check and result.returncode:
    raise AssertionError(f'{args} failed:\n{result.stdout}\n{result.stderr}')
  return result


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['train_loss']) for r in map(json.loads, f) if 'train_loss' in r]


def wait_for(condition, process, timeout=240):
  start = time.time()
  while not condition():
    if process.poll() is not None:
      raise AssertionError(f'the run ended early:\n{process.stderr.read()}')
    if time.time() - start > timeout:
      raise AssertionError('timed out')
    time.sleep(0.1)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, tfds_dir):
  workdir = str(tmp_path_factory.mktemp('faults') / 'whole')
  run(train_args(workdir, tfds_dir))
  return losses(workdir)


# Runs the training command with orbax's final rename of checkpoint 40 stalled: the process is
# then "writing" that checkpoint (its files are in orbax's temporary directory) until killed.
STALL_CHECKPOINT_40 = '''
import pathlib, runpy, sys, time
from orbax.checkpoint._src.path import atomicity
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def stalled(self):
  if str(self._tmp_path).rstrip('/').split('/')[-1].startswith('40.'):
    pathlib.Path(marker).touch()
    time.sleep(600)
  return await finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = stalled
marker, sys.argv = sys.argv[1], ['train'] + sys.argv[4:]
runpy.run_module('train', run_name='__main__')
'''


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint_and_a_second_process(uninterrupted, tfds_dir,
                                                                tmp_path):
  workdir = str(tmp_path / 'run')
  marker = str(tmp_path / 'writing_40')
  victim = subprocess.Popen([sys.executable, '-c', STALL_CHECKPOINT_40, marker,
                             *train_args(workdir, tfds_dir)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    wait_for(lambda: os.path.exists(marker), victim)
    # A second process on the same directory is refused while the first holds it.
    second = run(train_args(workdir, tfds_dir), check=False)
    assert second.returncode == 2 and 'Traceback' not in second.stderr, second.stderr
    assert f'process {victim.pid} on ' in second.stderr and f'is training in {workdir}' in (
        second.stderr)
  finally:
    victim.send_signal(signal.SIGKILL)
    victim.wait()
  checkpoints = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert '20' in checkpoints and '40' not in checkpoints  # 40 was being written
  assert any(name.startswith('40.') for name in checkpoints)

  result = run(train_args(workdir, tfds_dir))  # the same command: no stale lock, resumes at 20
  assert 'resuming from step 20' in result.stderr
  assert losses(workdir) == uninterrupted
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '40', '60']


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])  # preemption, Ctrl-C
def test_a_signal_saves_a_checkpoint_and_the_same_command_resumes(signum, tfds_dir, tmp_path):
  whole, workdir = str(tmp_path / 'whole'), str(tmp_path / 'run')
  args = dict(steps=400, checkpoint_every=200)
  run(train_args(whole, tfds_dir, **args))
  process = subprocess.Popen([sys.executable, *train_args(workdir, tfds_dir, **args)], cwd=ROOT,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  wait_for(lambda: os.path.exists(metrics) and len(losses(workdir)) >= 3, process)
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 128 + signum, stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith(f'interrupted by {signum.name} at step ') and last.endswith(
      '; checkpoint saved; run the same command to resume'), stderr
  assert 'Traceback' not in stderr
  step = int(last.split('at step ')[1].split(';')[0])
  assert 30 <= step < 400 and str(step) in os.listdir(os.path.join(workdir, 'checkpoints'))

  result = run(train_args(workdir, tfds_dir, **args))
  assert f'resuming from step {step}' in result.stderr
  assert losses(workdir) == losses(whole)
