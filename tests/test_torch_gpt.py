"""experiments/benchmark/torch_gpt.py and pytorch.py: the PyTorch peer is nanoGPT's architecture
(its parameter count by hand, a tied head, causal attention, weight decay on the 2-D weights only)
and learns; the comparison's arithmetic; without PyTorch, one line and exit status 2. The tests
that need PyTorch are skipped where it is absent (`pip install -e '.[peer]'`)."""

import json
import os
import subprocess
import sys

import pytest
from ml_collections import ConfigDict

from experiments.benchmark import pytorch
from experiments.configs import pytorch_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides) -> ConfigDict:
  c = pytorch_benchmark.get_config()
  c.update(dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=61, batch_size=4,
                threads=1, steps_per_timing=2, warmup=1, repeats=2), **overrides)
  return c


def test_parameters_are_nanogpts_counted_by_hand():
  torch_gpt = pytest.importorskip('experiments.benchmark.torch_gpt')
  pytest.importorskip('torch')
  model = torch_gpt.gpt(tiny())
  V, L, D, layers = 61, 16, 32, 2
  # Token embedding (also the head: tied), positions, per block two LayerNorm gains (no biases),
  # the fused q/k/v projection 3 D^2, the attention output D^2, the MLP's D -> 4D -> D 8 D^2;
  # the final LayerNorm's gain.
  by_hand = V * D + L * D + layers * (2 * D + 3 * D * D + D * D + 8 * D * D) + D
  assert by_hand == 27_200
  assert sum(p.numel() for p in model.parameters()) == by_hand
  # nanogpt_cpu's shape: nanoGPT prints "number of parameters: 0.80M" (804,096 less 8,192
  # position embeddings).
  full = torch_gpt.gpt(pytorch_benchmark.get_config())
  assert sum(p.numel() for p in full.parameters()) == 65 * 128 + 64 * 128 + 4 * (
      2 * 128 + 12 * 128 * 128) + 128 == 804_096


def test_the_head_is_the_token_embedding_and_attention_is_causal():
  torch_gpt = pytest.importorskip('experiments.benchmark.torch_gpt')
  torch = pytest.importorskip('torch')
  model = torch_gpt.gpt(tiny())
  idx = torch.randint(61, (2, 16), generator=torch.Generator().manual_seed(0))
  logits, _ = model(idx, idx)
  changed = idx.clone()
  changed[:, 10] = (changed[:, 10] + 1) % 61
  logits_changed, _ = model(changed, changed)
  assert torch.equal(logits[:, :10], logits_changed[:, :10])  # no position sees its future
  assert not torch.allclose(logits[:, 10:], logits_changed[:, 10:])
  with torch.no_grad():
    model.token_embedding.weight[60].zero_()
  logits, loss = model(idx, idx)
  assert torch.all(logits[..., 60] == 0)  # the head reads the same matrix...
  loss.backward()
  unseen = sorted(set(range(61)) - set(idx.flatten().tolist()))
  assert unseen  # tokens not in the input: only the head gives their rows a gradient
  assert torch.all(model.token_embedding.weight.grad[unseen].abs().sum(-1) > 0)  # ... and trains it


def test_adamw_decays_the_2d_weights_only_and_the_steps_lower_the_loss():
  torch_gpt = pytest.importorskip('experiments.benchmark.torch_gpt')
  pytest.importorskip('torch')
  config = tiny(lr=1e-2)
  model, step = torch_gpt.train_steps(config)
  optimizer_groups = torch_gpt.adamw(model, config).param_groups
  decayed, plain = optimizer_groups
  assert decayed['weight_decay'] == 0.1 and plain['weight_decay'] == 0.0
  assert {p.dim() for p in decayed['params']} == {2}
  assert {p.dim() for p in plain['params']} == {1}
  assert len(plain['params']) == 2 * 2 + 1  # the LayerNorm gains
  losses = [float(step().detach()) for _ in range(30)]
  assert losses[0] == pytest.approx(4.11, abs=0.1)  # ln 61: a uniform guess
  assert losses[-1] < losses[0] - 1.0


def test_measure_times_the_steps_it_runs():
  torch_gpt = pytest.importorskip('experiments.benchmark.torch_gpt')
  pytest.importorskip('torch')
  row = torch_gpt.measure(tiny(optimizer='fused', sample_batches=True, read_loss=True))
  assert row['params'] == 27_200
  assert len(row['timings_ms_per_step']) == 2
  assert row['tokens_per_s'] == pytest.approx(4 * 16 / (row['step_ms'] / 1e3))
  assert 0 < row['cpu_ms_per_step'] < 2 * 2 * row['step_ms'] + 5  # at most both threads busy
  assert row['harness']['optimizer'] == 'fused'


def test_rounds_are_summarised_as_medians_and_ratios_to_pytorch():
  rounds = [{'nexttoken': 24.0, 'pytorch': 20.0, 'v': 10.0},
            {'nexttoken': 26.0, 'pytorch': 10.0, 'v': 10.0},
            {'nexttoken': 36.0, 'pytorch': 30.0, 'v': 10.0}]
  s = pytorch.summarise(rounds, {'nexttoken': [None] * 3, 'pytorch': [5.0, 9.0, 6.0],
                                 'v': [1.0, 2.0, 3.0]})
  assert s['nexttoken']['cpu_ms_per_step'] is None and s['pytorch']['cpu_ms_per_step'] == 6.0
  assert s['nexttoken']['median'] == 26.0
  assert s['nexttoken']['ratio_of_medians'] == 26.0 / 20.0
  assert s['nexttoken']['median_ratio'] == 1.2  # of 1.2, 2.6 and 1.2
  assert s['v']['median_ratio'] == 0.5
  assert 'round 3' in pytorch.format_table(s)


def test_variants_and_the_nexttoken_shape_follow_the_config():
  config = tiny(variants='optimizer=fused; threads=2 read_loss=true ;')
  entries = pytorch.commands(config, '/tmp/x')
  assert list(entries) == ['nexttoken', 'pytorch', 'optimizer=fused', 'threads=2 read_loss=true']
  assert entries['threads=2 read_loss=true'][-2:] == ['--config.threads=2',
                                                      '--config.read_loss=true']
  assert '--config.catalog.nanogpt_cpu.model.pattern=attn*2' in entries['nexttoken']
  # The SwiGLU width of nanogpt_cpu (experiments/configs/benchmark.py) for width 128.
  assert pytorch.swiglu_width(128) == 344 and pytorch.swiglu_width(32) == 88
  with pytest.raises(Exception, match='not key=value'):
    pytorch.commands(tiny(variants='optimiser=fused'), '/tmp/x')


def test_without_pytorch_the_command_says_so_in_one_line(tmp_path):
  hide_torch = ("import runpy, sys; sys.modules['torch'] = None; "
                "sys.argv = ['torch_gpt', '--workdir=' + sys.argv[1]]; "
                "runpy.run_module('experiments.benchmark.torch_gpt', run_name='__main__', "
                "alter_sys=True)")
  result = subprocess.run([sys.executable, '-c', hide_torch, str(tmp_path / 'peer')], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('error: PyTorch is not installed')
  assert not os.path.exists(tmp_path / 'peer')  # nothing left behind


@pytest.mark.slow
def test_the_comparison_runs_end_to_end(tmp_path):
  pytest.importorskip('torch')
  workdir = tmp_path / 'peer'
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmark.pytorch', f'--workdir={workdir}',
       '--config.n_layer=2', '--config.n_embd=32', '--config.block_size=16',
       '--config.batch_size=4', '--config.repeats=2', '--config.steps_per_timing=2',
       '--config.rounds=2', '--config.nexttoken_repeats=2', '--config.variants=threads=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  saved = json.loads((workdir / 'pytorch_benchmark.json').read_text())
  assert list(saved['entries']) == ['nexttoken', 'pytorch', 'threads=1']
  assert all(len(e['tokens_per_s']) == 2 for e in saved['entries'].values())
  nexttoken = json.loads((workdir / 'rounds' / '1' / 'nexttoken' / 'benchmark.json').read_text())
  assert nexttoken['train'][0]['seq_len'] == 16 and nexttoken['train'][0]['batch_size'] == 4
