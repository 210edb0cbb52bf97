"""experiments/benchmark.py: the rows it measures hold what the issue's benchmark.json promises,
and MFU is the counting utilities' FLOPs times the measured rate over the peak."""

import pytest
from ml_collections import ConfigDict

from experiments import benchmark
from experiments.configs import base
from experiments.configs import benchmark as benchmark_config
from model import ModelConfig, count_params, training_flops_per_token


def tiny_shape(**model) -> ConfigDict:
  m = base.model_config(vocab_size=61, d_model=32, num_heads=4, d_ff=64, pattern='attn*2',
                        scan_layers=False, max_len=64)
  m.update(model)
  return ConfigDict(dict(model=m, batch_size=2, seq_len=16, decode_contexts=(24,),
                         decode_new_tokens=4))


def test_train_row():
  shape = tiny_shape(pattern='attn:moe,mamba')  # every mixer and feed-forward kind
  peak = 1e11
  row = benchmark.bench_train('tiny', shape, steps_per_call=2, repeats=1, peak=peak)
  assert {'name', 'tokens_per_s', 'mfu', 'step_ms', 'compile_s', 'peak_memory_bytes'} <= set(row)
  assert row['tokens_per_s'] > 0 and row['compile_s'] > 0 and row['peak_memory_bytes'] > 0
  assert row['step_ms'] == pytest.approx(1e3 * 2 * 16 / row['tokens_per_s'])
  flops = training_flops_per_token(ModelConfig.from_dict(shape.model), 16)
  assert row['mfu'] == pytest.approx(flops * row['tokens_per_s'] / peak)


def test_decode_row_and_table():
  row = benchmark.bench_decode('tiny', tiny_shape(), context=24, repeats=1)
  assert row['context'] == 24 and row['new_tokens'] == 4
  assert row['cached_tokens_per_s'] > 0 and row['uncached_tokens_per_s'] > 0
  assert row['speedup'] == pytest.approx(row['cached_tokens_per_s'] / row['uncached_tokens_per_s'])
  table = benchmark.format_table({'device': 'cpu', 'peak_flops_per_s': 1e11, 'decode': [row],
                                  'train': []})
  assert 'tiny' in table and 'speedup' in table


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
