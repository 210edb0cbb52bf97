"""experiments/stages.py: a stage is reused only when its record holds the requested config and
the records of the stages it was made from; a killed or refused stage leaves nothing that looks
complete. Then the stale reuses it replaced (issue 32, item 8): posttrain's corpus and DPO pairs,
extrapolation's results, the sweep's finished runs."""

import json
import os
import uuid

import pytest

from experiments import stages
from model.config import ConfigError
from train.workdir import RunError


class Killed(Exception):
  """Stands in for a kill or a refusal in the middle of a stage."""


def writer(calls: list, text: str):
  """A stage's `make`: writes `text` to its one output, counting its calls."""
  def make(path):
    calls.append(path)
    with open(path, 'w') as f:
      f.write(text)
    return {'wrote': text}
  return make


def read(path) -> str:
  with open(path) as f:
    return f.read()


def test_a_stage_is_done_only_with_the_same_config(tmp_path):
  out, calls = str(tmp_path / 'out.txt'), []
  stage = stages.Stage(str(tmp_path), 'a', {'x': 1, 'train': {'lr': 0.1, 'log_every': 5}}, [out])
  assert stages.done(stage) is None
  record = stages.run(stage, writer(calls, 'one'))
  assert read(out) == 'one' and record['result'] == {'wrote': 'one'}
  assert calls == [out + '.partial']  # written under another name, then renamed
  assert stages.done(stage) == record
  assert stages.run(stage, writer(calls, 'two')) == record and len(calls) == 1  # reused
  # How often a run logs does not change what it computes: still done.
  assert stages.done(stages.Stage(str(tmp_path), 'a', {'x': 1, 'train': {
      'lr': 0.1, 'log_every': 50}}, [out])) == record

  changed = stages.Stage(str(tmp_path), 'a', {'x': 2, 'train': {'lr': 0.1, 'log_every': 5}},
                         [out])
  assert stages.changes(changed, record) == ['x: 1 -> 2']
  again = stages.run(changed, writer(calls, 'two'))
  assert read(out) == 'two' and len(calls) == 2 and again['id'] != record['id']
  os.remove(out)  # an output removed by hand: made again
  assert stages.run(changed, writer(calls, 'three'))['id'] != again['id']
  assert read(out) == 'three' and len(calls) == 3


def test_a_stage_made_from_a_stage_made_again_is_made_again(tmp_path):
  d, calls = str(tmp_path), []
  up = stages.run(stages.Stage(d, 'up', {'x': 1}, [str(tmp_path / 'up')]), writer([], 'u1'))
  down = stages.Stage(d, 'down', {'y': 1}, [str(tmp_path / 'down')], [up])
  first = stages.run(down, writer(calls, 'd1'))
  assert stages.run(down, writer(calls, 'd1')) == first and len(calls) == 1
  # The upstream stage made again with the very same config (its output was lost): the
  # downstream one was made from the old one, so it is stale though its own config is the same.
  os.remove(tmp_path / 'up')
  up2 = stages.run(stages.Stage(d, 'up', {'x': 1}, [str(tmp_path / 'up')]), writer([], 'u2'))
  down2 = stages.Stage(d, 'down', {'y': 1}, [str(tmp_path / 'down')], [up2])
  assert stages.changes(down2, first) == ['up was made again']
  stages.run(down2, writer(calls, 'd2'))
  assert len(calls) == 2 and read(tmp_path / 'down') == 'd2'


@pytest.mark.parametrize('directory', [False, True])
def test_a_killed_or_refused_stage_leaves_nothing_that_is_reused(tmp_path, directory):
  out = str(tmp_path / 'data' / 'out')
  stage = stages.Stage(str(tmp_path), 'a', {'x': 1}, [out])

  def dies(path):
    if directory:
      os.makedirs(path)
      path = os.path.join(path, 'part0.txt')
    with open(path, 'w') as f:
      f.write('half')
    raise Killed

  with pytest.raises(Killed):
    stages.run(stage, dies)
  assert not os.path.exists(out) and stages.saved(stage) is None
  calls = []
  stages.run(stage, writer(calls, 'whole'))
  assert read(out) == 'whole' and calls == [out + '.partial']
  assert sorted(os.listdir(tmp_path / 'data')) == ['out']  # the killed attempt's is gone

  # An output left by something that kept no record (an older version, a hand) is not trusted.
  os.remove(stage.record_path)
  stages.run(stage, writer(calls, 'remade'))
  assert read(out) == 'remade'


def test_a_run_in_place_resumes_when_unfinished_and_starts_afresh_when_stale(tmp_path):
  run_dir = str(tmp_path / 'run')
  seen = []

  def train(path):
    seen.append(sorted(os.listdir(path)) if os.path.exists(path) else None)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f'checkpoint{len(seen)}'), 'w'):
      pass
    return {'step': len(seen)}

  stage = stages.Stage(str(tmp_path), 'run', {'lr': 1}, [run_dir])
  os.makedirs(run_dir)
  open(os.path.join(run_dir, 'checkpoint0'), 'w').close()  # an interrupted run
  assert stages.run(stage, train, in_place=True)['result'] == {'step': 1}
  assert seen == [['checkpoint0']]  # handed to the loop as it was: it resumes
  stages.run(stages.Stage(str(tmp_path), 'run', {'lr': 2}, [run_dir]), train, in_place=True)
  assert seen[-1] is None  # finished from another config: removed, trained afresh
  assert os.listdir(run_dir) == ['checkpoint2']


def test_a_sweeps_finished_run_of_another_config_is_refused_in_one_line(tmp_path):
  from ml_collections import ConfigDict
  from experiments import sweep
  point = type('Point', (), {})()
  point.name, point.config = 'p', ConfigDict({'train': {'lr': 0.1, 'log_every': 5}})
  row = {'name': 'p', 'config': point.config.to_dict()}
  sweep.append_run(str(tmp_path), row)
  ran = []
  done, missing = sweep.run_grid([point], str(tmp_path), (0, 1), lambda p, d: ran.append(p))
  assert done == {'p': row} and not missing and not ran
  point.config.train.log_every = 50  # reporting only: still the same run
  sweep.run_grid([point], str(tmp_path), (0, 1), lambda p, d: ran.append(p))
  point.config.train.lr = 0.2
  with pytest.raises(RunError, match=r'already holds run p with another config: train.lr: 0.1 '
                                     r'-> 0.2\. Use a new --workdir') as e:
    sweep.run_grid([point], str(tmp_path), (0, 1), lambda p, d: ran.append(p))
  assert '\n' not in str(e.value) and not ran


# ---------------------------------------------------------------------------------------------
# Posttrain's stages, with the training loop and the sampling replaced by stand-ins that record
# what each stage read (the real stages are minutes; tests/test_posttrain.py trains them).


def tiny_posttrain(tfds_dir):
  from experiments.configs import posttrain as posttrain_config
  c = posttrain_config.get_config()
  c.task.update(max_operand=9, num_train=80, num_test=20, num_demonstrations=20,
                num_rl_prompts=20, num_pairs=30, lines_per_document=5, tfds_data_dir=tfds_dir)
  return c


def contents(path: str) -> str:
  """A file's text, or a directory's files' texts in name order."""
  if os.path.isdir(path):
    return ''.join(read(os.path.join(path, n)) for n in sorted(os.listdir(path)))
  return read(path)


@pytest.fixture
def stand_ins(monkeypatch):
  """Training writes DIR/<stage>/model.txt, a new id per training, and keeps what it trained
  on; sampling tags each pair with the SFT model it came from. Returns the trainings in order."""
  import experiments.posttrain.__main__ as posttrain
  from train import loop
  trained = []

  def train_and_evaluate(config, run_dir):
    os.makedirs(run_dir, exist_ok=True)
    model = uuid.uuid4().hex
    with open(os.path.join(run_dir, 'model.txt'), 'w') as f:
      f.write(model)
    trained.append({'dir': os.path.basename(run_dir), 'model': model,
                    'data': contents(config.data.path)})
    return {'val_loss': 1.0, 'step': config.train.num_steps}

  def sample_pairs(sft_dir, config, problems, path):
    with open(path, 'w') as f:
      f.write(json.dumps({'prompt': 'What is 1 + 1?', 'chosen': '2', 'rejected': '3',
                          'sft': read(os.path.join(sft_dir, 'model.txt'))}) + '\n')

  monkeypatch.setattr(loop, 'train_and_evaluate', train_and_evaluate)
  monkeypatch.setattr(posttrain, 'sample_pairs', sample_pairs)
  return trained


def test_posttrain_base_never_trains_on_the_corpus_of_another_task_config(tfds_dir, tmp_path,
                                                                          stand_ins, monkeypatch):
  import experiments.posttrain.__main__ as posttrain
  from experiments.posttrain import task
  from train import loop
  workdir = str(tmp_path / 'posttrain')
  config = tiny_posttrain(tfds_dir)
  problems = task.load(config.task)
  config.task.num_demonstrations = 1000  # refused before anything is written
  with pytest.raises(ConfigError, match='task.num_demonstrations=1000'):
    posttrain.train_stages(config, workdir, problems, {})
  assert not os.path.exists(workdir)

  config.task.num_demonstrations = 20
  stand_in = loop.train_and_evaluate

  def refused(config, run_dir):
    raise RunError('refused')

  monkeypatch.setattr(loop, 'train_and_evaluate', refused)
  with pytest.raises(RunError):  # the base refused, after the corpus was written
    posttrain.train_stages(config, workdir, problems, {})
  monkeypatch.setattr(loop, 'train_and_evaluate', stand_in)

  config.task.error_rate = 0.5  # the corrected command: another corpus
  posttrain.train_stages(config, workdir, problems, {})
  t = config.task
  docs = task.documents(problems.train, 0.5, t.lines_per_document, t.seed, t.passes,
                        t.equation_share)
  base = stand_ins[0]
  assert base['dir'] == 'base' and base['data'] == '\n'.join(docs)
  assert contents(os.path.join(workdir, 'data', 'corpus')) == '\n'.join(docs)


def test_posttrain_samples_dpo_pairs_again_after_sft_is_retrained(tfds_dir, tmp_path, stand_ins,
                                                                  monkeypatch):
  import experiments.posttrain.__main__ as posttrain
  from experiments.posttrain import task
  workdir = str(tmp_path / 'posttrain')
  config = tiny_posttrain(tfds_dir)
  problems = task.load(config.task)

  def killed(*args):
    with open(args[-1], 'w') as f:
      f.write('{"prompt": "half')
    raise Killed

  sample = posttrain.sample_pairs
  monkeypatch.setattr(posttrain, 'sample_pairs', killed)  # killed while sampling
  with pytest.raises(Killed):
    posttrain.train_stages(config, workdir, problems, {})
  assert not os.path.exists(os.path.join(workdir, 'data', 'dpo.jsonl'))  # nothing to reuse
  monkeypatch.setattr(posttrain, 'sample_pairs', sample)
  posttrain.train_stages(config, workdir, problems, {})
  models = {t['dir']: t for t in stand_ins}
  assert [t['dir'] for t in stand_ins] == ['base', 'sft', 'reward', 'dpo', 'grpo', 'rlhf']
  pairs = json.loads(read(os.path.join(workdir, 'data', 'dpo.jsonl')))
  assert pairs['sft'] == models['sft']['model']
  assert json.loads(models['dpo']['data'])['sft'] == models['sft']['model']

  posttrain.train_stages(config, workdir, problems, {})  # the same command: nothing again
  assert len(stand_ins) == 6

  config.stages.sft.lr = 1e-4  # SFT retrained: every stage made from it is made again
  del stand_ins[:]
  posttrain.train_stages(config, workdir, problems, {})
  assert [t['dir'] for t in stand_ins] == ['sft', 'reward', 'dpo', 'grpo', 'rlhf']
  new_sft = stand_ins[0]['model']
  assert json.loads(read(os.path.join(workdir, 'data', 'dpo.jsonl')))['sft'] == new_sft
  assert json.loads(stand_ins[2]['data'])['sft'] == new_sft  # DPO trained on the new pairs

  config.sampling.temperature = 0.5  # other pairs from the same SFT model: DPO again, alone
  del stand_ins[:]
  posttrain.train_stages(config, workdir, problems, {})
  assert [t['dir'] for t in stand_ins] == ['dpo']


# ---------------------------------------------------------------------------------------------
# Extrapolation: a saved result stands only for the config it was made from.


def test_extrapolation_evaluates_again_when_its_lengths_change(tfds_dir, tmp_path, monkeypatch):
  from experiments.configs import extrapolation as xp_config
  from experiments.extrapolation.__main__ import run_scheme
  from train import loop
  from tests.conftest import SHAKESPEARE
  config = xp_config.get_config()
  config.model.update(d_model=16, num_heads=2, d_ff=32, pattern='attn*1')
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(read(SHAKESPEARE)[:20_000])  # its whole validation split: a moment
  config.data.update(path=str(corpus), tfds_data_dir=tfds_dir, seq_len=16)
  config.train.update(num_steps=4, batch_size=4, warmup_steps=1, steps_per_call=2, log_every=2,
                      checkpoint_every=4, eval_batches=1, eval_batch_size=8, peak_flops=1e11)
  config.sweep.update(schemes=('rope',), lengths=(16, 32), rope_scalings=(), eval_tokens=256)
  workdir = str(tmp_path / 'xp')
  first = run_scheme(config, 'rope', workdir)
  assert list(first['loss_by_length']) == ['16', '32']

  monkeypatch.setattr(loop, 'train_and_evaluate', lambda *a: pytest.fail('trained again'))
  config.sweep.lengths = (16, 32, 64)  # the same model, evaluated at more lengths
  second = run_scheme(config, 'rope', workdir)
  assert list(second['loss_by_length']) == ['16', '32', '64']
  assert second['loss_by_length']['16'] == pytest.approx(first['loss_by_length']['16'])
  assert second['train_s'] == first['train_s']  # the training's, kept in its record


def test_posttrain_refuses_to_write_dpo_pairs_when_sft_gave_none(tfds_dir, tmp_path,
                                                                 monkeypatch):
  """An SFT model that answers every question alike gives no (right, wrong) pair: one line that
  names the fix, and no empty dpo.jsonl for DPO to be refused on (or a later run to reuse)."""
  import types
  import numpy as np
  import experiments.posttrain.__main__ as posttrain
  from eval import respond as respond_lib
  from experiments.posttrain import task
  from train import restore
  from train.chat import ChatTemplate
  from train.data import DataError
  from train.tokenizers import ByteTokenizer
  config = tiny_posttrain(tfds_dir)
  config.sampling.num_prompts = 5
  tokenizer = ByteTokenizer()
  monkeypatch.setattr(restore, 'load_run', lambda d: types.SimpleNamespace(
      tokenizer=tokenizer, template=ChatTemplate(), model=None, params=None))
  monkeypatch.setattr(respond_lib, 'respond', lambda model, params, prompts, **kw: [
      tokenizer.encode('7')] * len(prompts))  # always 7: 1 + 1 is never answered right
  problems = task.Problems(train=np.ones((10, 2), np.int64), test=np.ones((1, 2), np.int64))
  path = str(tmp_path / 'dpo.jsonl')
  with pytest.raises(DataError, match=r'no prompt of sampling.num_prompts=5 got both a right and '
                                      r'a wrong answer .*stages.sft.num_steps'):
    posttrain.sample_pairs('sft', config, problems, path)
  assert not os.path.exists(path)


def test_a_scaling_sweeps_corpus_of_another_data_section_is_refused(tmp_path):
  from experiments.configs import scaling_cpu
  from experiments.scaling.__main__ import CORPUS_CONFIG, prepare_corpus
  text = tmp_path / 'corpus.txt'
  text.write_text('a tiny corpus of characters, repeated. ' * 200)
  config = scaling_cpu.get_config()
  config.data.update(path=str(text), tokenizer='char', seq_len=16,
                     tfds_data_dir=str(tmp_path / 'tfds'))
  workdir = str(tmp_path / 'sweep')
  corpus = prepare_corpus(config, workdir)
  listing = sorted(os.listdir(corpus))
  config.data.tfds_data_dir = str(tmp_path / 'elsewhere')  # where TFDS keeps files: the same
  assert prepare_corpus(config, workdir) == corpus
  config.data.seq_len = 32
  with pytest.raises(RunError, match=r'sweep/corpus was prepared with another config: '
                                     r'data.seq_len: 16 -> 32\. Use a new --workdir'):
    prepare_corpus(config, workdir)
  assert sorted(os.listdir(corpus)) == listing
  # A corpus prepared before its record named its section (the data fields alone) still stands.
  record = json.load(open(os.path.join(corpus, CORPUS_CONFIG)))
  json.dump(record['data'], open(os.path.join(corpus, CORPUS_CONFIG), 'w'))
  config.data.seq_len = 16
  assert prepare_corpus(config, workdir) == corpus
