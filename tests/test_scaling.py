"""Scaling laws: the fits recover known laws from noisy synthetic runs; the sweep driver runs a
grid, skips finished runs, resumes an interrupted one, shards the grid, and writes its summary."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import experiments.scaling.__main__ as scaling
from experiments.scaling import fits as scaling_fits
from experiments.configs import scaling_cpu
from model import ModelConfig, count_params, training_flops_per_token
from train import loop
from train.metric_writer import MetricWriter
from train.workdir import RunError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Hoffmann et al.'s fitted constants: the law the synthetic runs follow.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def synthetic_runs(noise=0.005, seed=0, sizes=np.geomspace(1e6, 6.4e7, 6),
                   budgets=np.geomspace(2e7, 3.2e8, 5)):
  """A grid whose losses follow L = E + A/N^alpha + B/D^beta times log-normal noise; C = 6ND."""
  rng = np.random.default_rng(seed)
  return [dict(name=f'n{n:.0f}_d{d:.0f}', N=float(n), D=float(d), flops_per_token=6 * n,
               C=6 * n * d, wall_s=1.0,
               loss=float((E + A * n ** -ALPHA + B * d ** -BETA) * np.exp(rng.normal(0, noise))))
          for n in sizes for d in budgets]


def test_fits_recover_known_laws_with_intervals():
  # Without noise, a one-term law comes back exactly.
  n = np.geomspace(1e4, 1e7, 8)
  law = scaling_fits.fit_law([n], 1.5 + 300 * n ** -0.4)
  np.testing.assert_allclose([law.E, law.A[0], law.alpha[0]], [1.5, 300, 0.4], rtol=1e-3)

  runs = synthetic_runs()
  s = scaling_fits.summarize(runs, num_bootstrap=20)
  assert s['num_runs'] == 30 and len(s['model_sizes']) == 6 and len(s['token_budgets']) == 5
  # L(N) at the largest budget has the law's alpha (B/D^beta joins the constant); L(D) its beta.
  ln, ld, ch, fr = s['loss_vs_N'], s['loss_vs_D'], s['chinchilla'], s['frontier']
  assert abs(ln['alpha'] - ALPHA) < 0.05 and ln['r2'] > 0.99 and ln['D'] == max(s['token_budgets'])
  assert abs(ld['beta'] - BETA) < 0.05 and ld['r2'] > 0.99
  # Chinchilla's fit recovers every constant; its intervals hold the true exponents.
  assert abs(ch['alpha'] - ALPHA) < 0.03 and abs(ch['beta'] - BETA) < 0.03
  assert abs(ch['E'] - E) < 0.2 and ch['r2'] > 0.99
  assert ch['alpha_ci'][0] < ALPHA < ch['alpha_ci'][1]
  assert ch['beta_ci'][0] < BETA < ch['beta_ci'][1]
  # The IsoFLOP minima give the compute-optimal split: a = beta/(alpha+beta), b = 1 - a for C=6ND.
  a = BETA / (ALPHA + BETA)
  assert abs(fr['a'] - a) < 0.05 and abs(fr['b'] - (1 - a)) < 0.05 and fr['a_r2'] > 0.95
  assert abs(ch['a'] - a) < 0.02
  assert fr['isoflop_minima'] and all(p['N_opt'] > 0 for p in fr['isoflop_minima'])
  env = fr['envelope']
  assert all(x['C'] < y['C'] and x['loss'] > y['loss'] for x, y in zip(env, env[1:]))
  # ... and the envelope falls as C^-(alpha beta / (alpha + beta)), the optimal allocation's rate.
  assert fr['loss_vs_C']['r2'] > 0.98
  assert abs(fr['loss_vs_C']['gamma'] - ALPHA * BETA / (ALPHA + BETA)) < 0.03
  for fit, keys in ((ln, ('E', 'A', 'alpha')), (ld, ('E', 'B', 'beta')),
                    (ch, ('E', 'A', 'B', 'alpha', 'beta')), (fr, ('a', 'b'))):
    for k in keys:
      lo, hi = fit[f'{k}_ci']
      assert lo <= fit[k] <= hi, (k, fit[k], lo, hi)
    assert fit['bootstrap'] > 10
  json.dumps(s)  # summary.json's content


@pytest.mark.slow
def test_analyze_and_compare(tmp_path):
  # Two sweeps' runs.jsonl (the second noisier): refit and plot one from the command line, then
  # compare both on one figure (fitting the second on the way).
  dirs = [tmp_path / 'dense', tmp_path / 'other']
  for d, noise in zip(dirs, (0.005, 0.02)):
    d.mkdir()
    for row in synthetic_runs(noise=noise):
      scaling.append_run(str(d), row)

  def run(*args):  # the command line, as a user runs it
    return subprocess.run([sys.executable, '-m', 'experiments.scaling', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)

  result = run(f'--workdir={dirs[0]}', '--bootstrap=5')
  assert result.returncode == 0, result.stderr
  assert re.search(r'L\(N\) = E \+ A N\^-alpha: R2 (0\.99\d|1\.000)', result.stdout)
  summary = json.load(open(dirs[0] / 'summary.json'))
  assert summary['num_runs'] == 30 and summary['total_run_wall_s'] == 30.0
  assert os.path.getsize(dirs[0] / 'scaling.png') > 10_000

  out = scaling.compare([str(d) for d in dirs], str(tmp_path / 'cmp'), num_bootstrap=5)
  assert os.path.getsize(out) > 10_000 and (dirs[1] / 'summary.json').exists()

  # Bad input: errors the command line prints as one line (main catches SweepError).
  assert scaling.parse_shard('1/4') == (1, 4)
  for shard in ('2/2', '-1/2', 'x'):
    with pytest.raises(scaling.SweepError, match=r'write i/n with 0 <= i < n'):
      scaling.parse_shard(shard)
  result = run(f'--workdir={tmp_path / "empty"}')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert 'runs.jsonl holds no runs' in result.stderr, result.stderr


class Preempted(Exception):
  """Stands in for a kill between two checkpoints."""


def tiny_sweep(tfds_dir):
  c = scaling_cpu.get_config()
  c.sweep.update(depths=(1, 2), tokens=(1024, 2048))  # d_model 16 and 32; 8 and 16 steps
  c.data.update(tfds_data_dir=tfds_dir, seq_len=32)
  c.train.update(batch_size=4, warmup_steps=2, steps_per_call=4, checkpoint_every=4,
                 log_every=4, eval_batch_size=512, peak_flops=1e11)
  return c


@pytest.mark.slow
def test_sweep_shards_resumes_skips_and_records(tfds_dir, tmp_path, monkeypatch, capfd):
  config, workdir = tiny_sweep(tfds_dir), str(tmp_path / 'sweep')
  names = [p.name for p in scaling.grid(config, vocab=65)]
  assert names == ['depth1_tokens1024', 'depth1_tokens2048', 'depth2_tokens1024',
                   'depth2_tokens2048']
  # A compute cap leaves out the runs above it: here the larger model's larger budget.
  capped = scaling.grid(config, vocab=65)[:3]
  config.sweep.max_flops = max(p.C for p in capped)
  assert [p.name for p in scaling.grid(config, vocab=65)] == [p.name for p in capped]
  config.sweep.max_flops = 0.0

  # Shard 0 of 2 is killed in its second run, after the checkpoint at step 4 (a call's rows are
  # written after its checkpoint) and before the one at step 8.
  write = MetricWriter.write

  def write_then_die(self, step, metrics):
    write(self, step, metrics)
    if 'depth2' in self.path and step == 4:
      raise Preempted

  monkeypatch.setattr(MetricWriter, 'write', write_then_die)
  with pytest.raises(Preempted):
    scaling.sweep(config, workdir, shard=(0, 2))
  monkeypatch.undo()
  assert list(scaling.read_runs(workdir)) == ['depth1_tokens1024']

  capfd.readouterr()
  shard0 = scaling.sweep(config, workdir, shard=(0, 2))  # the same command again
  err = capfd.readouterr().err
  assert 'resuming from step 4' in err and 'depth2_tokens1024' in err
  assert 'depth1_tokens1024' not in err  # finished: skipped
  assert sorted(shard0) == ['depth1_tokens1024', 'depth2_tokens1024']
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))  # the grid is not complete

  rows = scaling.sweep(config, workdir, shard=(1, 2), num_bootstrap=5)
  assert sorted(rows) == sorted(names)  # the two shards split the grid: disjoint, complete
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  assert summary['num_runs'] == 4 and len(summary['model_sizes']) == 2
  for key in ('loss_vs_N', 'loss_vs_D', 'chinchilla', 'frontier'):
    assert 'needs at least' in summary[key]['skipped']  # 2 x 2 runs are too few for any law
  assert os.path.exists(os.path.join(workdir, 'scaling.png'))

  row = rows['depth2_tokens2048']
  model_cfg = ModelConfig.from_dict(dict(row['config']['model'], vocab_size=65))
  assert (row['depth'], row['d_model'], row['pattern'], row['steps']) == (2, 32, 'attn*2', 16)
  assert row['N'] == count_params(model_cfg).non_embedding and row['D'] == 16 * 4 * 32
  assert row['C'] == training_flops_per_token(model_cfg, 32) * row['D']
  assert row['C_6ND'] == 6 * row['N'] * row['D'] and row['wall_s'] > 0
  assert row['config']['train']['num_steps'] == 16  # the schedule ends with the budget
  assert rows['depth2_tokens2048']['loss'] < rows['depth1_tokens1024']['loss'] < math.log(65)
  links = {os.path.realpath(os.path.join(workdir, 'runs', n, 'tokenizer')) for n in names}
  assert links == {os.path.realpath(os.path.join(workdir, 'corpus', 'tokenizer'))}

  # Everything done: nothing trains again; a changed training config is refused.
  monkeypatch.setattr(loop, 'train_and_evaluate', lambda *a: pytest.fail('trained again'))
  assert scaling.sweep(config, workdir, num_bootstrap=5) == rows
  config.train.lr = 1e-2
  with pytest.raises(RunError, match=r'train.lr: 0.002 -> 0.01'):
    scaling.sweep(config, workdir)
