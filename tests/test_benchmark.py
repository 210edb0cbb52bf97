"""experiments/benchmark.py: the rows it measures hold what the issue's benchmark.json promises;
tokens/s is the tokens the timed program was fed over the time its runs took (a fake clock), and
MFU is the counting utilities' FLOPs times that rate over the peak."""

import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import pytest
from ml_collections import ConfigDict

import experiments.benchmark.__main__ as benchmark
from experiments.configs import base
from experiments.configs import benchmark as benchmark_config
from model import ModelConfig, count_params


def tiny_shape(**model) -> ConfigDict:
  m = base.model_config(vocab_size=61, d_model=32, num_heads=4, d_ff=64, pattern='attn*2',
                        scan_layers=False, max_len=64)
  m.update(model)
  return ConfigDict(dict(model=m, batch_size=2, seq_len=16, decode_contexts=(24,),
                         decode_new_tokens=4))


class Program:
  """A jitted call, its lowering or its compiled executable, wrapped so that every run of it,
  however it is reached (`f(...)` or `f.lower(...).compile()(...)`), is reported to `ran(args)`;
  anything else (`memory_analysis`, ...) is the wrapped object's."""

  def __init__(self, inner, ran):
    self.inner, self.ran = inner, ran

  def lower(self, *args, **kwargs):
    return Program(self.inner.lower(*args, **kwargs), self.ran)

  def compile(self, *args, **kwargs):
    return Program(self.inner.compile(*args, **kwargs), self.ran)

  def __call__(self, *args):
    out = self.inner(*args)
    self.ran(args)
    return out

  def __getattr__(self, name):
    return getattr(self.inner, name)


def spy_on_the_train_call(monkeypatch, seconds: float) -> types.SimpleNamespace:
  """The program `train.loop.train_call` builds, watched: `built` holds (d_model, batch size) of
  each build, `fed` the tokens each run of the program was fed (its batch's inputs). The clock
  `train.perf` reads stands still but for each such run, which takes exactly `seconds` on it: a
  benchmark that timed any other work would measure no time at all."""
  from train import loop, perf
  build, clock = loop.train_call, [0.0]
  spied = types.SimpleNamespace(built=[], fed=[])

  def ran(args):
    spied.fed.append(int(np.size(args[1]['inputs'])))
    clock[0] += seconds

  def spy(model, optimizer, train_cfg, *args, **kwargs):
    spied.built.append((model.config.d_model, train_cfg.batch_size))
    return Program(build(model, optimizer, train_cfg, *args, **kwargs), ran)
  monkeypatch.setattr(loop, 'train_call', spy)
  monkeypatch.setattr(perf, 'time', types.SimpleNamespace(perf_counter=lambda: clock[0]))
  return spied


def test_train_row_rates_are_the_tokens_fed_over_the_time_taken(monkeypatch):
  """tokens/s, step time and MFU against what the timed program was fed and how long its runs
  took on a fake clock: 2 steps of 2 x 16 tokens, 64 tokens a run, each run 0.5 s."""
  peak, steps, repeats = 1e11, 2, 3
  spied = spy_on_the_train_call(monkeypatch, seconds=0.5)
  row = benchmark.bench_train('tiny', tiny_shape(), steps_per_call=steps, repeats=repeats,
                              peak=peak)
  assert spied.fed == [64] * (1 + repeats)  # a warm-up run, then the timed ones
  assert row['tokens_per_s'] == 64 / 0.5 == 128
  assert row['step_ms'] == 1e3 * 0.5 / 2   # a run is 2 steps
  # By hand: N = 2 x (4 x 32 x 32 attention + 3 x 32 x 64 SwiGLU + 2 x 32 norms) + 32 = 20,640;
  # 6 x (N + the head's 32 x 61) + 2 layers x 12 x 16 keys x 4 heads x 8 = 147,840.
  assert row['flops_per_token'] == 147_840
  assert row['mfu'] == pytest.approx(147_840 * 128 / peak)


def test_train_row_times_within_its_call():
  peak, steps, repeats = 1e11, 2, 2
  start = time.perf_counter()
  row = benchmark.bench_train('tiny', tiny_shape(), steps_per_call=steps, repeats=repeats,
                              peak=peak)
  elapsed = time.perf_counter() - start
  # The timed calls and the compile happened inside the call: their sum cannot exceed its wall
  # time (a clock read before the device finished would break the tokens/s, not this).
  assert row['compile_s'] + repeats * steps * row['step_ms'] / 1e3 < elapsed
  # Parameters, Adam's two moments: 3 x 22,592 float32 values must fit in the peak memory.
  assert row['peak_memory_bytes'] >= 3 * 22_592 * 4


def test_decode_row_and_table():
  start = time.perf_counter()
  row = benchmark.bench_decode('tiny', tiny_shape(), context=24, repeats=1)
  elapsed = time.perf_counter() - start
  assert row['context'] == 24 and row['new_tokens'] == 4
  # One timed call of each (after a warm-up call) happened inside: 4 tokens over each rate.
  assert 4 / row['cached_tokens_per_s'] + 4 / row['uncached_tokens_per_s'] < elapsed
  table = benchmark.format_table({'device': 'cpu', 'peak_flops_per_s': 1e11, 'decode': [row],
                                  'train': []})
  assert 'tiny' in table and f'{row["speedup"]:.1f}x' in table


def test_catalog_shapes_match_their_comments():
  """Every shape builds a model (the accelerator ones are only checked here, with XLA attention);
  the MoE shapes have the active parameters of their dense shape, Mamba about its total."""
  c = benchmark_config.get_config()
  counts = {}
  for name in (c.cpu + ',' + c.accelerator).split(','):
    cfg = ModelConfig.from_dict(c.catalog[name].model).replace(attention_impl='xla')
    assert cfg.max_len >= c.catalog[name].seq_len, name
    counts[name] = count_params(cfg)
  for dense, moe, mamba in [('nanogpt_cpu', 'moe_cpu', 'mamba_cpu'),
                            ('gpt2_small', 'moe_gpt2_small', 'mamba_gpt2_small')]:
    n = counts[dense].non_embedding
    assert counts[moe].active_non_embedding == pytest.approx(n, rel=0.01)
    assert counts[moe].non_embedding > 2.5 * n
    assert counts[mamba].non_embedding == pytest.approx(n, rel=0.2)
  assert counts['mamba2_cpu'].non_embedding == pytest.approx(counts['mamba_cpu'].non_embedding,
                                                             rel=0.01)


@pytest.mark.slow
def test_loader_wait_is_the_iterators_time_per_step_after_the_first_call(tmp_path, tfds_dir,
                                                                         monkeypatch):
  """experiments/benchmark/loader.py: a BatchIterator made to take 50 ms per batch, and 1 s more
  on its first call (read before the compile, left out), waits 50 ms a step."""
  from experiments.benchmark import loader
  from tests.conftest import run_config
  from train import data
  take, calls = data.BatchIterator.next, []

  def slow(iterator, steps):
    time.sleep(0.05 * steps + (1.0 if not calls else 0.0))
    calls.append(steps)
    return take(iterator, steps)
  monkeypatch.setattr(data.BatchIterator, 'next', slow)
  config = run_config(tfds_dir, train=dict(num_steps=20, steps_per_call=5, eval_every=0,
                                           checkpoint_every=0))
  result = loader.wait_per_step(config, str(tmp_path))
  assert calls == [5] * 4 and result['calls'] == 4
  assert result['first_call_ms'] >= 1250
  assert 50 <= result['ms_per_step'] < 90
  assert os.listdir(tmp_path) == []  # the scratch run is gone


def test_profile_sums_the_innermost_op_events_by_kind():
  """experiments/benchmark/profile.py on events as jax.profiler's perfetto trace writes them: a
  `while` thunk holding its body's thunks counts only through them."""
  from experiments.benchmark import profile
  def op(name, ts, dur, tid=1, module='jit_multi_step'):
    return {'ph': 'X', 'tid': tid, 'ts': ts, 'dur': dur, 'name': name,
            'args': {'hlo_op': name, 'hlo_module': module}}
  events = [op('while.3', 0, 100), op('dot.1', 1, 30), op('copy_bitcast_fusion.12', 40, 20),
            op('dot.2', 70, 25), op('dot.7', 200, 10, tid=2), op('ynn_fusion', 300, 5),
            op('dot.1', 400, 1000, module='jit_other'),  # another program's: left out
            {'ph': 'X', 'tid': 1, 'ts': 2, 'dur': 1, 'name': 'ThreadpoolListener::Record'}]
  assert [e['name'] for e in profile.innermost_op_events(events[:5])] == [
      'dot.1', 'copy_bitcast_fusion.12', 'dot.2', 'dot.7']
  trace = os.path.join(tempfile.mkdtemp(), 'perfetto_trace.json.gz')
  with gzip.open(trace, 'wt') as f:
    json.dump({'traceEvents': events}, f)
  module, kinds = profile.time_by_kind(trace)
  assert module == 'jit_other'  # the most op time
  events[-2]['dur'] = 1
  with gzip.open(trace, 'wt') as f:
    json.dump({'traceEvents': events}, f)
  module, kinds = profile.time_by_kind(trace)
  assert module == 'jit_multi_step'
  assert kinds == {'dot': {'us': 65, 'count': 3}, 'copy_bitcast_fusion': {'us': 20, 'count': 1},
                   'ynn_fusion': {'us': 5, 'count': 1}}


def test_profile_of_a_train_call(tmp_path):
  """A real trace of the training loop's call at a tiny shape: its op events are the call's
  matmuls and fusions, within the traced wall time."""
  from experiments.benchmark import profile
  from experiments.configs import profile_benchmark
  config = profile_benchmark.get_config()
  config.catalog['tiny'] = tiny_shape()
  config.update(calls=2, steps_per_call=2)
  result = profile.profile('tiny', config, str(tmp_path / 'trace'))
  kinds = {r['kind']: r for r in result['kinds']}
  assert result['module'] == 'jit_multi_step' and result['steps'] == 4
  # Two layers' projections, MLP and head, forward and backward: many matmuls a step.
  assert sum(r['per_step'] for k, r in kinds.items() if k.startswith('dot')) >= 12
  assert sum(r['share'] for r in result['kinds']) == pytest.approx(1.0)
  assert 0 < result['op_ms_per_step'] < result['wall_ms_per_step_traced']
  assert 'the rest' in profile.format_table(result, top=3)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_command(*argv) -> None:
  result = subprocess.run([sys.executable, '-m', *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_the_loader_and_profile_commands_write_their_results(tmp_path, tfds_dir):
  run_command('experiments.benchmark.loader', f'--workdir={tmp_path / "loader"}',
              f'--config.data.tfds_data_dir={tfds_dir}', '--config.model.d_model=32',
              '--config.model.d_ff=64', '--config.model.pattern=attn*2',
              '--config.train.num_steps=20', '--config.train.steps_per_call=5',
              '--config.train.eval_batches=1', '--config.runs=2')
  saved = json.loads((tmp_path / 'loader' / 'loader_benchmark.json').read_text())
  assert [r['calls'] for r in saved['runs']] == [4, 4]
  assert saved['median_ms_per_step'] >= 0
  shape = '--config.catalog.nanogpt_cpu.'
  run_command('experiments.benchmark.profile', f'--workdir={tmp_path / "profile"}',
              '--config.programs=nanogpt_cpu,grokking', '--config.calls=1',
              '--config.steps_per_call=2', f'{shape}model.d_model=32', f'{shape}model.d_ff=64',
              f'{shape}model.pattern=attn*2', f'{shape}batch_size=2', f'{shape}seq_len=16')
  saved = json.loads((tmp_path / 'profile' / 'profile.json').read_text())
  assert [p['program'] for p in saved['programs']] == ['nanogpt_cpu', 'grokking']
  assert [p['steps'] for p in saved['programs']] == [2, 10]
  assert all(any(r['kind'].startswith('dot') for r in p['kinds']) for p in saved['programs'])


def tiny_variants_config() -> ConfigDict:
  from experiments.configs import variants_benchmark
  c = variants_benchmark.get_config()
  c.update(rounds=2, repeats=1)
  c.mlp.update(rows=5, d_model=4, d_ff=8, lengths=(1, 3))
  tiny = tiny_shape(num_kv_heads=2).model
  c.clip.model = c.attention.model = tiny
  c.attention.update(batch=2, seq_len=8)
  return c


def test_each_variant_computes_the_same_in_both_forms_and_the_results_hold_their_rows(tmp_path):
  import jax

  from experiments.benchmark import variants

  c = tiny_variants_config()
  for name in variants.VARIANTS:
    for case, programs in variants.VARIANTS[name](c):
      first, second = [fn(*args) for fn, args in programs.values()]
      for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f'{name}: {case}')
      if name == 'clip_norm':  # the random gradient is far above the threshold: clipped to it
        norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(first)))
        assert norm == pytest.approx(c.clip.grad_clip, rel=1e-5)
  c.variants = 'mlp_layout,clip_norm'  # the command's own run compiles again: two suffice
  variants.run(c, str(tmp_path))
  saved = json.loads((tmp_path / 'variants_benchmark.json').read_text())
  assert [(r['variant'], r['forms']) for r in saved['rows']] == [
      ('mlp_layout', ['3d', '2d']), ('mlp_layout', ['3d', '2d']), ('clip_norm', ['optax', 'vdot'])]
  for r in saved['rows']:
    assert r['max_rel_diff'] < 1e-6
    assert all(len(ms) == 2 and min(ms) > 0 for ms in r['ms'].values())
    first, second = r['forms']
    assert r['ratio'] == pytest.approx(r['median_ms'][first] / r['median_ms'][second])
