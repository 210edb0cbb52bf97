"""experiments/configs/*.py:quick: every experiment's small preset (experiments/configs/base.py:
with_preset) is a smaller run than its default, named in its docstring, and runs end to end
through its command into the files the default writes; an unknown preset is one error line."""

import importlib
import json
import os
import subprocess
import sys

import pytest
from ml_collections import ConfigDict

from experiments.configs import base
from model.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'experiments', 'configs')

# Each config with a quick preset: the command that runs it, and the files it promises.
QUICK = {
    'shakespeare_char': ('train', ('config.json', 'metrics.jsonl', 'checkpoints/300')),
    'grokking': ('experiments.grokking', ('summary.json', 'grokking.png', 'fourier.png')),
    'grokking_nanda2023': ('experiments.grokking', ('summary.json', 'grokking.png',
                                                    'fourier.png')),
    'induction': ('experiments.induction', ('summary.json', 'induction.png',
                                            'induction_heads.png')),
    'needle': ('experiments.needle', ('needle.json', 'needle.png')),
    'extrapolation': ('experiments.extrapolation', ('summary.json', 'extrapolation.png')),
    'posttrain': ('experiments.posttrain', ('summary.json', 'accuracy.png', 'rl_curves.png')),
    'recall': ('experiments.recall', ('summary.json', 'recall.png', 'state.png')),
    'scaling_cpu': ('experiments.scaling', ('summary.json', 'scaling.png')),
    'speculative': ('experiments.speculative', ('bench.jsonl', 'summary.json',
                                                'speculative.png')),
    'benchmark': ('experiments.benchmark', ('benchmark.json',)),
    'moe_benchmark': ('experiments.benchmark.moe', ('moe_benchmark.json',)),
    'ssm_benchmark': ('experiments.benchmark.ssm', ('ssm_benchmark.json', 'ssm_benchmark.png')),
    'grokking_bench': ('experiments.grokking.bench', ('grokking_bench.json',)),
    'variants_benchmark': ('experiments.benchmark.variants', ('variants_benchmark.json',)),
}
# Configs without one: base (what the others start from), the TPU ones, whose work is compiling
# for a slice (minutes a shape) or a dry run that already takes no training, the benchmarks of
# one figure each whose defaults take a few minutes (loader, profile, PyTorch peer), and the
# distillation student, a shakespeare_char recipe trained against a teacher run.
WITHOUT = {'base', 'benchmark_tpu', 'scaling_tpu', 'loader_benchmark', 'profile_benchmark',
           'pytorch_benchmark', 'shakespeare_char_student'}


def config_names() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(CONFIGS) if f.endswith('.py') and f != '__init__.py')


def leaves(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ConfigDict):
      yield from leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def sizes(config) -> dict[str, int | float]:
  """How much work each sizing field asks for: step and repeat counts, numbers of things (num_*,
  eval_tokens), and the length of every list of things to run (schemes, lengths, depths, ...,
  or comma-separated names)."""
  out = {}
  for path, value in leaves(config):
    name = path.rsplit('.', 1)[-1]
    if isinstance(value, (tuple, list)) and name != 'weight_decay_exclude':
      out[path] = len(value)
    elif name in ('cpu', 'patterns') and isinstance(value, str):
      out[path] = len(value.replace('|', ',').split(','))
    elif (name in ('num_steps', 'repeats', 'eval_tokens') or name.startswith('num_')) and (
        isinstance(value, (int, float)) and not isinstance(value, bool)):
      out[path] = value
  return out


def test_every_config_is_listed():
  assert set(config_names()) == set(QUICK) | WITHOUT


@pytest.mark.parametrize('name', sorted(QUICK))
def test_the_quick_preset_is_a_smaller_run_named_in_the_docstring(name):
  module = importlib.import_module(f'experiments.configs.{name}')
  default, quick = sizes(module.get_config()), sizes(module.get_config('quick'))
  assert default.keys() == quick.keys()
  grown = {k: (default[k], quick[k]) for k in default if quick[k] > default[k]}
  assert not grown, grown
  assert any(quick[k] < default[k] for k in default), 'the preset shrinks nothing'
  assert f'--config=experiments/configs/{name}.py:quick' in module.__doc__


@pytest.mark.parametrize('name', config_names())
def test_an_unknown_preset_names_the_known_ones(name):
  module = importlib.import_module(f'experiments.configs.{name}')
  known = "choose 'quick', or" if name in QUICK else 'it has none'
  with pytest.raises(ConfigError, match=f"unknown preset 'quik': {known}"):
    module.get_config('quik')


def test_a_preset_setting_a_missing_field_is_refused():
  with pytest.raises(ConfigError, match=r"preset 'quick' sets train.num_stepz, which the config "
                                        r'does not have'):
    base.with_preset(base.get_config(), 'quick', quick={'train.num_stepz': 10})
  changed = base.with_preset(base.get_config(), 'quick', quick={'train.num_steps': 10})
  assert changed.train.num_steps == 10 and base.get_config().train.num_steps == 1000


def test_a_wrong_preset_on_the_command_line_is_one_error_line(tmp_path):
  grokking = 'experiments/configs/grokking.py'
  cases = [
      (('experiments.grokking', f'--config={grokking}:quik'),
       f"error: --config={grokking}:quik: unknown preset 'quik': choose 'quick', or the file "
       'alone for the default'),
      (('experiments.scaling', '--config=experiments/configs/scaling_tpu.py:quick'),
       "unknown preset 'quick': it has none; give the file alone for the default"),
      (('experiments.grokking', f'--config={grokking}:quick', '--config.train.num_stepz=3'),
       "error: --config.train.num_stepz: config.train has no key 'num_stepz'"),
  ]
  processes = [subprocess.Popen([sys.executable, '-m', *args, f'--workdir={tmp_path}/run'],
                                cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for args, _ in cases]  # side by side: each is mostly importing JAX
  for (_, message), process in zip(cases, processes):
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err, err
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(QUICK))
def test_the_quick_preset_runs_end_to_end(name, tmp_path, tfds_dir):
  command, files = QUICK[name]
  module = importlib.import_module(f'experiments.configs.{name}')
  # TFDS's prepared corpora and generated tasks in the session's directory, not the home one.
  tfds_dirs = [f'--config.{path}={tfds_dir}' for path, _ in leaves(module.get_config('quick'))
               if path.endswith('tfds_data_dir')]
  workdir = tmp_path / 'run'
  # As a user runs it: without the suite's unoptimised XLA (tests/conftest.py), which halves the
  # compiles but slows these runs' many steps more than that.
  env = dict(os.environ, XLA_FLAGS=os.environ.get('XLA_FLAGS', '').replace(
      '--xla_backend_optimization_level=0', ''))
  result = subprocess.run(
      [sys.executable, '-m', command, f'--config=experiments/configs/{name}.py:quick',
       f'--workdir={workdir}', *tfds_dirs], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  missing = [f for f in files if not os.path.exists(workdir / f)]
  assert not missing, (missing, sorted(os.listdir(workdir)))
  for f in files:
    if f.endswith('.json'):
      with open(workdir / f) as fh:
        assert json.load(fh), f
