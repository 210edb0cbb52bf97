"""A tiny run compiled for a real TPU slice (v5e:2x2) on this CPU (train/compile_for.py): every
mesh compiles, memory follows the batch and the parameter sharding, collectives are the ones each
parallelism implies, and wrong input is refused before compiling or reported as not fitting."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from experiments.configs import base
from model import ConfigError, count_params
from tests.conftest import needs_libtpu
from train import compile_for
from train import mesh as mesh_lib
from train.compile_for import TopologyError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_run(pattern='attn', batch_size=8, **mesh):
  """A small one-layer run on the 4 chips of v5e:2x2: width 512 (heads of 128, whole TPU tiles)
  and a 512-token vocabulary, so that the parameters and optimizer state outweigh a small batch's
  activations."""
  c = base.get_config()
  c.model.update(vocab_size=512, d_model=512, num_heads=4, d_ff=1024, pattern=pattern,
                 scan_layers=False)
  c.model.moe.update(num_experts=4, top_k=2, d_ff=512)
  c.data.seq_len = 32
  c.train.update(batch_size=batch_size, eval_batch_size=8, steps_per_call=2)
  c.mesh.update(dict(dict(data=1, fsdp=1, tensor=1, expert=1), **mesh))
  return c


CASES = {
    'data': tiny_run(data=4),
    'fsdp': tiny_run(fsdp=4),
    'fsdp_big_batch': tiny_run(fsdp=4, batch_size=64),
    'tensor': tiny_run(tensor=4),
    'expert': tiny_run('attn:moe', data=1, expert=4),
}


@functools.cache
def report(name: str) -> dict:
  """The train call of CASES[name] compiled for v5e:2x2, once per test process: the tests that
  read a case share its compile (a module fixture would compile every case in each worker)."""
  return compile_for.compile_run(CASES[name], 'v5e:2x2', programs=('train',))


def train_memory(name: str) -> dict:
  return report(name)['programs']['train']['memory']


@pytest.mark.slow
@needs_libtpu
def test_a_small_model_compiles_for_v5e_under_each_mesh_with_the_collectives_it_implies():
  for name in ('data', 'fsdp', 'tensor', 'expert'):
    r = report(name)
    assert r['chips'] == 4 and r['chip']['name'] == 'v5e' and r['mesh'][name] == 4
    memory = train_memory(name)
    assert memory['fits'] and 0 < memory['total'] < memory['hbm'], name
    # The compiled matmuls do the model's work, 6 N D plus attention; an MoE does more (its
    # capacity factor of 1.25 and its dispatch and combine einsums).
    ratio = r['estimate']['compiled_flops_per_step'] / r['estimate']['model_flops_per_step']
    assert 0.9 < ratio < (1.6 if name == 'expert' else 1.1), name
  params = count_params(compile_for.model_config(CASES['data'])).total
  steps = CASES['data'].train.steps_per_call
  data = report('data')['programs']['train']['collectives']
  # Data parallelism: the float32 gradients are summed over the 4 chips once a step.
  assert set(data) == {'all-reduce'}
  assert data['all-reduce']['bytes'] / steps == pytest.approx(4 * params, rel=0.01)
  # FSDP gathers the parameters and reduce-scatters the gradients.
  fsdp = report('fsdp')['programs']['train']['collectives']
  assert fsdp['all-gather']['runs'] > 0 and fsdp['reduce-scatter']['runs'] > 0


@pytest.mark.slow
@needs_libtpu
def test_memory_grows_with_the_batch_and_falls_when_fsdp_splits_the_parameters():
  data, fsdp, big = (train_memory(n) for n in ('data', 'fsdp', 'fsdp_big_batch'))
  # 8 times the rows: each chip's 448 more tokens need at least their float32 logits. (Under
  # fsdp, whose optimizer update is a quarter of data parallelism's, activations set the peak.)
  extra_tokens = (64 - 8) * 32 // 4
  assert big['temporaries'] - fsdp['temporaries'] >= extra_tokens * 512 * 4
  assert big['total'] > fsdp['total']
  # The state (parameters and two Adam moments, float32) is whole on each chip under data
  # parallelism and a quarter of it under fsdp=4 (a little more: the TPU's (8, 128) tiles pad a
  # (4 heads, 128) slice to 8 rows).
  state_bytes = 3 * 4 * count_params(compile_for.model_config(CASES['data'])).total
  assert data['arguments'] >= state_bytes
  assert fsdp['arguments'] < 0.35 * data['arguments']
  assert fsdp['total'] < data['total']


@needs_libtpu
def test_a_mesh_that_does_not_fit_the_slice_is_refused_before_compiling(monkeypatch):
  monkeypatch.setattr(compile_for, '_compile', lambda *a: pytest.fail('compiled'))
  with pytest.raises(mesh_lib.MeshError, match=r"v5e:2x2 has 4 chips.*'data': 8"):
    compile_for.compile_run(tiny_run(data=8), 'v5e:2x2')
  with pytest.raises(mesh_lib.MeshError, match='mesh axis tensor=4 does not divide'):
    compile_for.compile_run(_with(tiny_run(tensor=4), 'model.num_heads', 2), 'v5e:2x2')


def _with(config, dotted: str, value):
  section, key = dotted.split('.')
  config[section][key] = value
  return config


@needs_libtpu
def test_a_model_too_big_for_the_chip_is_reported_as_not_fitting():
  # A 16M-token vocabulary: the embedding, with Adam's moments and its gradient, needs 24 GiB.
  config = _with(tiny_run(data=4), 'model.vocab_size', 2 ** 24)
  config.model.update(d_model=64, num_heads=1)
  too_big = compile_for.compile_run(config, 'v5e:2x2', programs=('train',))
  memory = too_big['programs']['train']['memory']
  assert not memory['fits']
  assert memory['total'] > memory['hbm'] == 15.75 * 2 ** 30
  assert 'NO' in compile_for.format_report(too_big)


def test_an_unknown_topology_or_missing_libtpu_is_one_clear_error(monkeypatch):
  if importlib.util.find_spec('libtpu'):
    with pytest.raises(TopologyError, match='write GENERATION:AxB'):
      compile_for.topology_devices('v5litepod-16')
  monkeypatch.setitem(sys.modules, 'libtpu', None)  # as if not installed
  with pytest.raises(TopologyError, match=r"pip install -e '\.\[tpu\]'"):
    compile_for.topology_devices('v5e:2x2')


def test_every_compile_for_refusal_leaves_the_work_directory_as_it_found_it(tmp_path,
                                                                           monkeypatch):
  existing = tmp_path / 'run'
  existing.mkdir()
  (existing / 'notes.txt').write_text('mine')
  no_vocabulary = tiny_run(data=4)
  no_vocabulary.model.vocab_size = 0
  for workdir in (tmp_path / 'new' / 'compiled', existing):
    for config, topology, error in [(tiny_run(data=4), 'v5litepod-16', TopologyError),
                                    (no_vocabulary, 'v5e:2x2', ConfigError),
                                    (tiny_run(data=3), 'v5e:2x2', mesh_lib.MeshError)]:
      with pytest.raises(error):
        compile_for.compile_for(config, str(workdir), topology)
    with monkeypatch.context() as m:
      m.setitem(sys.modules, 'libtpu', None)  # as if not installed
      with pytest.raises(TopologyError, match='needs libtpu'):
        compile_for.compile_for(tiny_run(data=4), str(workdir), 'v5e:2x2')
  assert not os.path.exists(tmp_path / 'new')
  assert os.listdir(existing) == ['notes.txt']


def test_without_a_vocabulary_size_compile_for_says_to_set_it():
  config = tiny_run(data=4)
  config.model.vocab_size = 0
  with pytest.raises(ConfigError, match='set --config.model.vocab_size'):
    compile_for.model_config(config)


@pytest.mark.slow
@needs_libtpu
def test_the_command_line_reports_every_program_and_writes_compile_json(tmp_path):
  args = [sys.executable, '-m', 'train', '--config=experiments/configs/shakespeare_char.py',
          f'--workdir={tmp_path}', '--compile_for=v5e:2x2', '--config.model.vocab_size=65',
          '--config.train.steps_per_call=2', '--config.model.pattern=attn']
  result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'train (2 steps a call)' in result.stdout and 'estimate, not a measurement' in \
      result.stdout
  assert 'libtpu' not in result.stderr.lower() and 'E0000' not in result.stderr
  written = json.loads((tmp_path / 'compile.json').read_text())
  assert set(written['programs']) == {'train', 'eval', 'decode'}
  assert all(p['memory']['fits'] for p in written['programs'].values())
  # Wrong input is one line: a vocabulary the command cannot know without data.
  result = subprocess.run(args[:-2] + ['--config.model.vocab_size=0'], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      'error: --compile_for reads no data, so it cannot take the tokenizer\'s vocabulary '
      '(model.vocab_size=0): set --config.model.vocab_size']


@pytest.mark.slow
@needs_libtpu
def test_a_sweeps_runs_that_differ_in_steps_compile_once_and_take_time_in_proportion(
    monkeypatch, tmp_path, capsys):
  compiles = []  # the two runs are the data case but for their steps: its compile serves
  compiled = report('data')
  monkeypatch.setattr(compile_for, 'compile_run', lambda *a, **k: compiles.append(a) or compiled)
  short, long = tiny_run(data=4), tiny_run(data=4)
  short.train.num_steps, long.train.num_steps = 100, 300
  short.model.vocab_size = long.model.vocab_size = 0  # the sweep gives the vocabulary
  rows = compile_for.check_runs([('short', short), ('long', long)], 'v5e:2x2', 512,
                                str(tmp_path / 'compile.json'))
  assert len(compiles) == 1
  assert [r['fits'] for r in rows] == [True, True]
  assert rows[1]['hours'] == pytest.approx(3 * rows[0]['hours'])
  assert rows[0]['chip_hours'] == pytest.approx(4 * rows[0]['hours'])
  assert rows[0]['hours'] == pytest.approx(rows[0]['step_s'] * 100 / 3600)
  assert 'long' in capsys.readouterr().out
  assert [r['name'] for r in json.loads((tmp_path / 'compile.json').read_text())] == [
      'short', 'long']
