"""The command lines as a user runs them: train, evaluate, sample; and their bad-input errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'experiments/configs/shakespeare_char.py'


def run(*args, check=True):
  result = subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  if check and result.returncode:
    raise AssertionError(f'{args} failed:\n{result.stdout}\n{result.stderr}')
  return result


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tfds_dir):
  workdir = str(tmp_path_factory.mktemp('cli') / 'run')
  result = run('train', f'--config={CONFIG}', f'--workdir={workdir}',
               f'--config.data.tfds_data_dir={tfds_dir}', '--config.model.d_model=32',
               '--config.model.d_ff=64', '--config.model.pattern=attn*2',
               '--config.train.num_steps=30', '--config.train.steps_per_call=10',
               '--config.train.log_every=10', '--config.train.eval_every=0',
               '--config.train.checkpoint_every=30', '--config.train.peak_flops=1e11')
  assert 'done: step 30' in result.stdout
  return workdir


def test_train_eval_sample(trained):
  with open(os.path.join(trained, 'metrics.jsonl')) as f:
    final = [json.loads(line) for line in f][-1]
  out = run('eval', f'--workdir={trained}').stdout
  assert f'step 30: val_loss {final["val_loss"]:.4f}' in out  # the same whole-split loss
  assert json.load(open(os.path.join(trained, 'eval.json')))['step'] == 30

  greedy = [run('eval.sample', f'--workdir={trained}', '--prompt=ROMEO:', '--temperature=0',
                '--max_new_tokens=40').stdout for _ in range(2)]
  assert greedy[0] == greedy[1] and greedy[0].startswith('ROMEO:')
  assert len(greedy[0]) >= len('ROMEO:') + 40  # 40 characters were generated
  sampled = run('eval.sample', f'--workdir={trained}', '--prompt=ROMEO:', '--top_k=10',
                '--top_p=0.9', '--temperature=1.0', '--max_new_tokens=20', '--num_samples=2',
                '--stop=\\n').stdout
  assert sampled.count('ROMEO:') == 2


def test_eval_per_position_past_the_training_length(trained):
  """Loss by position at 2x the training length (64), RoPE stretched by YaRN: read whole, with
  the mean over the trained positions beside the mean past them."""
  out = run('eval', f'--workdir={trained}', '--per_position', '--seq_len=128', '--bucket=64',
            '--config.model.rope_scaling=yarn', '--config.model.rope_factor=2').stdout
  result = json.load(open(os.path.join(trained, 'eval_per_position.json')))
  assert result['seq_len'] == 128 and len(result['loss_by_position']) == 128
  assert result['rope_scaling'] == 'yarn' and len(result['buckets']) == 2
  assert 'positions     64-127    loss' in out and '(beyond the trained length)' in out


@pytest.mark.slow
def test_sample_with_a_draft(trained, tmp_path):
  """The run as its own draft: the greedy sample is the plain one and every draft is accepted;
  a draft whose tokenizer differs is one clear error."""
  plain = run('eval.sample', f'--workdir={trained}', '--prompt=ROMEO:', '--temperature=0',
              '--max_new_tokens=24').stdout
  out = run('eval.sample', f'--workdir={trained}', '--prompt=ROMEO:', '--temperature=0',
            '--max_new_tokens=24', f'--draft_workdir={trained}', '--num_draft=3').stdout
  sample, report = out.rstrip('\n').rsplit('\n', 1)
  assert sample + '\n' == plain
  assert 'acceptance 1.000' in report and 'tokens/s' in report
  other = tmp_path / 'other'
  shutil.copytree(trained, other)
  meta = next(p for p in (other / 'tokenizer').iterdir() if p.suffix == '.json')
  content = json.loads(meta.read_text())
  content['chars'] = content['chars'][::-1]  # the same size, another vocabulary
  meta.write_text(json.dumps(content))
  bad = run('eval.sample', f'--workdir={trained}', f'--draft_workdir={other}', check=False)
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
  assert 'has another tokenizer' in bad.stderr and 'Traceback' not in bad.stderr


@pytest.mark.slow
def test_bad_input_gets_one_clear_line(trained, tmp_path):
  cases = [
      (train_args(f'--workdir={tmp_path}', '--config.model.widht=3'),
       "config.model has no key 'widht'"),
      (train_args(f'--workdir={trained}', '--config.model.d_model=64',
        '--config.model.d_ff=64', '--config.model.pattern=attn*2'),
       'holds a run of another model or data'),
      (train_args(f'--workdir={tmp_path}/x',
        f'--config.data.path={tmp_path}/missing.txt', '--config.data.tfds_fallback='),
       'missing.txt does not exist'),
      (('eval.sample', f'--workdir={trained}', '--prompt=ROMEO ☃'),
       "outside the character vocabulary: ['☃']"),
      (('eval.sample', f'--workdir={trained}', '--prompt=ROMEO', '--stop=☃'),
       "outside the character vocabulary: ['☃']"),   # not its UTF-8 bytes read as Latin-1
      (train_args(f'--workdir={tmp_path}/y', '--config.train.log_every=0'),
       'train.log_every=0 must be a whole number >= 1'),
      (train_args(f'--workdir={tmp_path}/y', '--config.train.batch_size=12',
        '--config.train.grad_accum_steps=5'),
       'train.grad_accum_steps=5 does not divide train.batch_size=12'),
      (('eval', f'--workdir={tmp_path}/empty'), 'holds no run'),
      (('eval', f'--workdir={trained}', '--per_position', '--config.model.position=learned',
        '--config.model.max_len=64', '--seq_len=65'),
       'the evaluation length --seq_len (65) is longer than the learned position table'),
  ]
  for (args, message), result in zip(cases, run_all([args for args, _ in cases])):
    one_error_line(result, message)
  assert not os.path.exists(f'{tmp_path}/y')  # refused before anything was written


COMMANDS = ['train', 'eval', 'eval.sample', 'experiments.grokking', 'experiments.grokking.bench',
            'experiments.scaling', 'experiments.benchmark', 'experiments.benchmark.moe',
            'experiments.benchmark.ssm', 'experiments.benchmark.tpu', 'experiments.posttrain',
            'experiments.induction', 'eval.heads', 'eval.attention',
            'experiments.extrapolation', 'experiments.needle', 'experiments.speculative',
            'experiments.recall']


def run_all(argvs):
  """Runs the commands side by side; their CompletedProcess-like (returncode, stdout, stderr)."""
  processes = [subprocess.Popen([sys.executable, '-m', *argv], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in argvs]
  outputs = [p.communicate(timeout=300) for p in processes]
  return [(p.returncode, *output) for p, output in zip(processes, outputs)]


@pytest.mark.slow
def test_every_command_has_help_and_refuses_a_wrong_flag(tmp_path):
  helps = run_all([(command, '--help') for command in COMMANDS])
  for command, (code, out, err) in zip(COMMANDS, helps):
    assert code == 0, (command, err)
    assert '--workdir' in out + err and '--config' in out + err, command
  wrong = run_all([(command, f'--workdir={tmp_path}/{command}', '--no_such_flag=1')
                   for command in COMMANDS])
  for command, (code, out, err) in zip(COMMANDS, wrong):
    assert code == 2 and err.strip().splitlines() == [
        "error: Unknown command line flag 'no_such_flag'"], (command, err)
  # Positional arguments go through the one check every command shares (train.cli.run).
  two = ['train', 'experiments.scaling']
  extra = run_all([(command, f'--workdir={tmp_path}/{command}', 'stray') for command in two])
  for command, (code, out, err) in zip(two, extra):
    assert code == 2 and err.strip() == (
        "error: unexpected arguments ['stray']; every value is given as --flag=value"), (
        command, err)
  assert not any(os.path.exists(f'{tmp_path}/{command}') for command in COMMANDS)


def test_train_without_a_config_names_the_configs(tmp_path):
  result = run('train', f'--workdir={tmp_path}/run', check=False)
  assert result.returncode == 2
  assert 'error: --config is required' in result.stderr and 'shakespeare_char.py' in (
      result.stderr)


def listing(directory) -> dict:
  """Every file under `directory` with its bytes: what a refusal must leave as it was."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def train_args(*flags: str) -> tuple[str, ...]:
  """`python -m train` on the test config with `flags`."""
  return ('train', f'--config={CONFIG}', *flags)


def one_error_line(result: tuple, message: str) -> None:
  code, _, err = result
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert err.startswith('error: ') and message in err, err


def test_a_run_records_the_command_that_made_it(trained):
  with open(os.path.join(trained, 'command.json')) as f:
    assert json.load(f) == {'command': 'train', 'kind': 'run'}


def test_a_directory_is_refused_by_every_other_command(trained, tmp_path):
  """An experiment refuses a training run's directory, `train` an experiment's, and the
  commands that read a run say where an experiment's runs are; nothing is changed."""
  from train.workdir import RunError, check_command
  legacy = tmp_path / 'legacy_run'  # made before directories recorded their command
  shutil.copytree(trained, legacy, ignore=shutil.ignore_patterns('command.json', 'lock'))
  grokking = tmp_path / 'grokking'  # what experiments.grokking writes: no tokenizer, no checkpoint
  grokking.mkdir()
  (grokking / 'command.json').write_text('{"command": "experiments.grokking", '
                                         '"kind": "experiment"}')
  (grokking / 'config.json').write_text('{"task": {"prime": 59}, "train": {"lr": 0.01}}')
  (grokking / 'summary.json').write_text('{}')
  old_grokking = tmp_path / 'old_grokking'
  shutil.copytree(grokking, old_grokking, ignore=shutil.ignore_patterns('command.json'))
  sweep = tmp_path / 'sweep'  # an experiment whose training runs live in DIR/runs/<name>
  (sweep / 'runs').mkdir(parents=True)
  (sweep / 'command.json').write_text('{"command": "experiments.scaling", "kind": "experiment"}')
  shutil.copytree(trained, sweep / 'runs' / 'a', ignore=shutil.ignore_patterns('command.json'))
  (sweep / 'runs' / 'a' / 'command.json').write_text(
      '{"command": "experiments.scaling", "kind": "run"}')
  before = {d: listing(d) for d in (trained, legacy, grokking, old_grokking, sweep)}
  # (command, --workdir, what it makes there: None for a command that reads a run), the refusal
  cases = [
      ('experiments.grokking', trained, 'experiment',
       f'{trained} is a training run made by python -m train'),
      ('experiments.grokking', legacy, 'experiment', f'{legacy} is a training run'),
      ('experiments.induction', trained, 'experiment', f'{trained} is a training run'),
      ('train', grokking, 'run',
       f"{grokking} is an experiment's work directory made by python -m experiments.grokking"),
      ('train', sweep / 'runs' / 'a', 'run',
       f'{sweep}/runs/a is a training run made by python -m experiments.scaling'),
      ('experiments.scaling', sweep / 'runs' / 'a', 'experiment',
       'inside the work directory of python -m experiments.scaling'),
      ('eval.sample', grokking, None,
       f'{grokking} is the work directory of python -m experiments.grokking, not a training run'),
      ('eval', old_grokking, None, f'{old_grokking} holds no training run'),
      ('eval', sweep, None, f'its training runs are {sweep}/runs/a'),
  ]
  for command, directory, makes, message in cases:
    with pytest.raises(RunError, match=re.escape(message)):
      check_command(str(directory), command, makes)
  # What each command accepts: its own directory, a new one, a run made before the records.
  check_command(str(trained), 'train', 'run')
  check_command(str(legacy), 'train', 'run')
  check_command(str(grokking), 'experiments.grokking', 'experiment')
  check_command(str(sweep), 'experiments.scaling', 'experiment')
  check_command(str(tmp_path / 'new'), 'experiments.grokking', 'experiment')
  for run in (trained, legacy, sweep / 'runs' / 'a'):
    check_command(str(run), 'eval', None)
  # The command lines refuse through the one error path, before anything is written.
  wiring = [(('experiments.grokking', f'--workdir={trained}'), 'is a training run made by'),
            (train_args(f'--workdir={grokking}'), "an experiment's work")]
  for (args, message), result in zip(wiring, run_all([args for args, _ in wiring])):
    one_error_line(result, message)
  assert {d: listing(d) for d in before} == before


def test_wrong_input_is_one_error_line(trained, tmp_path):
  cut = tmp_path / 'cut'
  shutil.copytree(trained, cut)
  config = (cut / 'config.json').read_text()
  (cut / 'config.json').write_text(config[:len(config) // 2])
  cases = [
      (train_args(f'--workdir={tmp_path}/a', '--config.data.val_fraction=0'),
       'data.val_fraction=0 holds out nothing'),
      (train_args(f'--workdir={tmp_path}/b', '--config.train.lr=1e-3',
        '--config.train.min_lr=1e-2', '--config.train.num_steps=1'),
       'train.min_lr=0.01 is above train.lr=0.001'),
      (('eval.sample', f'--workdir={trained}', '--max_new_tokens=-3'),
       'flag --max_new_tokens=-3: -3 is not a positive integer'),
      (('train', f'--config={tmp_path}/missing.py', f'--workdir={tmp_path}/a'),
       f'--config={tmp_path}/missing.py: no such file'),
      (('experiments.grokking', f'--config={tmp_path}/missing.py', f'--workdir={tmp_path}/c'),
       f'--config={tmp_path}/missing.py: no such file'),
      (('eval', f'--workdir={cut}'), f'{cut}/config.json is not valid JSON'),
      (train_args(f'--workdir={cut}'), f'{cut}/config.json is not valid JSON'),
  ]
  for (args, message), result in zip(cases, run_all([args for args, _ in cases])):
    one_error_line(result, message)
  assert sorted(os.listdir(tmp_path)) == ['cut']  # refused: nothing else was even created


def test_a_cut_short_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
  from train.metric_writer import MetricWriter
  from train.workdir import RunError
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 10, "loss": 2.0}\n{"step": 20, "loss": 1.5}\n{"step": 30, "lo')
  MetricWriter(str(tmp_path), start_step=30).close()  # a kill mid-write: normal
  assert path.read_text() == '{"step": 10, "loss": 2.0}\n{"step": 20, "loss": 1.5}\n'
  assert 'warning: dropping the last line' in capsys.readouterr().out
  path.write_text('{"step": 10, "lo\n{"step": 20, "loss": 1.5}\n')  # damaged, not cut short
  with pytest.raises(RunError, match='metrics.jsonl line 1 is not JSON'):
    MetricWriter(str(tmp_path), start_step=30)
  assert path.read_text() == '{"step": 10, "lo\n{"step": 20, "loss": 1.5}\n'


def test_help_does_not_import_jax():
  """--help answers without importing JAX (seconds of CPU): nothing it prints needs it."""
  code = ('import runpy, sys\n'
          'sys.argv = [sys.argv[1], "--help"]\n'
          'try:\n'
          '  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)\n'
          'except SystemExit as e:\n'
          '  assert not e.code, e.code\n'
          'print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax")))\n')
  processes = [subprocess.Popen([sys.executable, '-c', code, command], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for command in COMMANDS]
  for command, p in zip(COMMANDS, processes):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, (command, err)
    assert out.strip().splitlines()[-1] == '[]', (command, out[-300:])
