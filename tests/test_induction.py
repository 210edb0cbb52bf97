"""The induction experiment: its corpus, what it reads off the metrics, and the command end to
end on a tiny run (experiments/induction/)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from eval import heads
from experiments.induction import analysis
from experiments.induction.__main__ import parse_patterns, run_name
from model.config import ConfigError
from tests.conftest import SHAKESPEARE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows_with(scores, icl):
  """Evaluation rows of a one-layer, two-head model whose head 1 has `scores` over the steps."""
  return [{'step': 10 * (i + 1), 'induction/layer_0/head_0': 0.01,
           'induction/layer_0/head_1': s, 'previous_token/layer_0/head_0': 0.3,
           'previous_token/layer_0/head_1': 0.1, 'max_induction_score': max(0.01, s),
           'max_previous_token_score': 0.3, 'icl_score': c, 'second_copy_loss': 1.0,
           'first_copy_loss': 4.0} for i, (s, c) in enumerate(zip(scores, icl))]


def test_phase_change_rise_and_strongest_head():
  scores = [0.02, 0.03, 0.02, 0.2, 0.7, 0.9, 0.92]
  rows = rows_with(scores, icl=[0.0, 0.0, 0.0, -0.1, -0.4, -0.5, -0.5])
  assert analysis.phase_change_step(rows) == 50          # first score >= 0.5
  assert analysis.phase_change_step(rows, threshold=0.95) is None
  # 10% of the way from 0.02 to 0.92 is 0.11, 90% is 0.83: last below, first at or above
  assert analysis.rise(rows) == (30, 60)
  summary = analysis.summarize(rows + [{'step': 70, 'train_loss': 1.0}])  # a training-only row
  assert summary['induction_head'] == [0, 1] and summary['phase_change_step'] == 50
  assert summary['max_induction_score'] == 0.92 and summary['icl_score'] == -0.5
  assert summary['previous_token_head'] is None          # no earlier layer
  table = analysis.head_table(rows[-1], 'previous_token')
  np.testing.assert_array_equal(table, [[0.3, 0.1]])


def test_a_model_without_heads_has_losses_only():
  # what the probe writes for a Mamba model: its head tables are all NaN (eval/heads.py)
  nan = np.full((2, 4), np.nan)
  flat = heads.flat_metrics({'induction': nan, 'previous_token': nan, 'first_copy_loss': 4.0,
                             'second_copy_loss': 2.5})
  assert flat == {'first_copy_loss': 4.0, 'second_copy_loss': 2.5}
  rows = [dict(flat, step=10 * i, icl_score=-0.1 * i) for i in range(1, 4)]
  summary = analysis.summarize(rows)
  assert summary['induction_head'] is None and summary['max_induction_score'] is None
  assert summary['phase_change_step'] is None and summary['rise_window'] is None
  assert summary['second_copy_loss'] == 2.5 and np.isclose(summary['icl_score'], -0.3)


def test_patterns_and_names():
  assert parse_patterns('attn:none,attn:none*2') == ['attn:none', 'attn:none*2']
  assert parse_patterns('(mamba,attn)*2,attn') == ['(mamba,attn)*2', 'attn']
  assert parse_patterns('mamba,attn|attn*2') == ['mamba,attn', 'attn*2']
  assert run_name('attn:none*2') == 'attn-nonex2'
  with pytest.raises(ConfigError, match='unknown mixer'):
    parse_patterns('attn,lstm')


def test_corpus_repeats_every_segment(tmp_path):
  from ml_collections import ConfigDict

  from experiments.induction import corpus
  cfg = ConfigDict(dict(synthetic_fraction=0.2, min_len=3, max_len=6, repeats=3, seed=0))
  path = corpus.write_corpus(cfg, SHAKESPEARE, str(tmp_path / 'corpus'), str(tmp_path / 'tfds'))
  with open(os.path.join(path, 'repeats.txt')) as f:
    lines = f.read().splitlines()
  text_chars = set(open(SHAKESPEARE).read()) - {'\n'}
  size = os.path.getsize(SHAKESPEARE)
  assert 0.2 * 0.9 < sum(len(x) + 1 for x in lines) / (size + sum(len(x) + 1 for x in lines)) < 0.3
  for line in lines[:500]:
    n = len(line) // 3
    assert 3 <= n <= 6 and line == line[:n] * 3 and set(line) <= text_chars


@pytest.mark.slow
def test_command_end_to_end(tmp_path, tfds_dir):
  workdir = tmp_path / 'run'
  text = tmp_path / 'text.txt'  # a corner of the text: tokenizing all of it takes seconds
  text.write_text(open(SHAKESPEARE).read()[:20000])
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.induction', f'--workdir={workdir}',
       f'--config.data.tfds_data_dir={tfds_dir}', '--config.patterns=attn:none*2',
       '--config.model.num_heads=4',
       '--config.model.d_model=16', '--config.data.seq_len=32', '--config.train.num_steps=20',
       '--config.train.steps_per_call=10', '--config.train.eval_every=10',
       '--config.train.log_every=10', '--config.train.checkpoint_every=20',
       '--config.train.batch_size=4', '--config.train.eval_batch_size=8',
       '--config.train.eval_batches=1', '--config.train.peak_flops=1e11',
       '--config.probe.period=8', '--config.probe.num_sequences=4',
       '--config.probe.num_contexts=8', '--config.probe.draw_period=6',
       f'--config.corpus.text_path={text}', '--config.corpus.synthetic_fraction=0.5'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  summary = json.load(open(workdir / 'summary.json'))['models']
  assert set(summary) == {'attn:none*2'}
  attn = summary['attn:none*2']
  for key in ('phase_change_step', 'max_induction_score', 'induction_head', 'icl_score'):
    assert key in attn
  assert len(attn['induction_head']) == 2 and attn['previous_token_head'] is not None
  rows = [json.loads(line) for line in open(workdir / 'attn-nonex2' / 'metrics.jsonl')]
  evals = [r for r in rows if 'second_copy_loss' in r]
  assert [r['step'] for r in evals] == [10, 20]
  assert sum(k.startswith('induction/layer_') for k in evals[-1]) == 2 * 4   # layers x heads
  assert all(0.0 <= r['max_induction_score'] <= 1.0 for r in evals)
  assert attn['max_induction_score'] == evals[-1]['max_induction_score']
  for name in ('induction.png', 'induction_heads.png', 'corpus/repeats.txt'):
    assert os.path.exists(workdir / name), name
  # the run is an ordinary one: the probe commands read it
  run_dir = str(workdir / 'attn-nonex2')
  commands = [subprocess.Popen([sys.executable, '-m', *args], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for args in (('eval.heads', f'--workdir={run_dir}', '--period=8',
                            '--num_sequences=4'),
                           ('eval.attention', f'--workdir={run_dir}', '--text=ROMEO: ROMEO:'))]
  (heads_out, heads_err), (_, attention_err) = [c.communicate(timeout=120) for c in commands]
  assert all(c.returncode == 0 for c in commands), heads_err + attention_err
  assert 'induction' in heads_out and os.path.exists(os.path.join(run_dir, 'attention.png'))
  again = json.load(open(os.path.join(run_dir, 'heads.json')))
  # the command measures what the probe measured at the last step (the same sequences)
  assert np.isclose(again['max_induction_score'], evals[-1]['max_induction_score'], atol=1e-5)
