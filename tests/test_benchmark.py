"""experiments/benchmark.py: the rows it measures hold what the issue's benchmark.json promises;
tokens/s is the tokens the timed program was fed over the time its runs took (a fake clock), and
MFU is the counting utilities' FLOPs times that rate over the peak."""

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
