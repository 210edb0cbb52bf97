"""Induction heads and in-context learning (Elhage et al. 2021; Olsson et al. 2022):

    python -m experiments.induction --workdir=DIR [--config=...induction.py]
        [--config.patterns='attn:none,attn:none*2,mamba*2']
        [--config.patterns='attn:none*2|mamba,attn']     # '|' when a pattern has commas

Trains one model per pattern of `config.patterns` (by default a one-layer and a two-layer
attention-only model) on a corpus where in-context copying pays (experiments/induction/corpus.py:
tiny shakespeare mixed with lines of repeated random segments), each a normal training run
(`train.loop.train_and_evaluate`) in DIR/<pattern>/ whose evaluator (probe.py) measures, every
`train.eval_every` steps, each head's induction and previous-token scores on repeated random
sequences, the loss on their first and second copies, and the ICL score on held-out contexts.

Writes into DIR:
  corpus/            the corpus, written once (the text linked, repeats.txt)
  <pattern>/         each model's run: metrics.jsonl (the scores at every evaluation), config,
                     checkpoint, tokenizer; `python -m eval.heads --workdir=DIR/<pattern>` and
                     `python -m eval.attention` read it
  summary.json       {"models": {pattern: {"phase_change_step", "max_induction_score",
                     "induction_head": [layer, head], "icl_score", ...}}} (analysis.py)
  induction.png      the scores against steps, each model's phase change marked
  induction_heads.png  the strongest induction head and its previous-token partner, drawn on a
                     repeated random sequence
Running the command again resumes or reuses each model's run.
"""

from __future__ import annotations

import json
import os
import re
import time

import ml_collections
from absl import flags

from train import cli

RUN_SECTIONS = ('model', 'data', 'train', 'mesh', 'chat', 'lora', 'dpo', 'rl')


def run_name(pattern: str) -> str:
  """A directory name for a pattern: 'attn:none*2' -> 'attn-none-x2'."""
  return re.sub(r'[^A-Za-z0-9_-]+', '-', pattern.replace('*', 'x')).strip('-')


def parse_patterns(text: str) -> list[str]:
  """'attn:none,attn:none*2' -> ['attn:none', 'attn:none*2']; top-level commas separate models,
  those inside parentheses belong to one pattern; '|' separates too ('mamba,attn|attn*2')."""
  from model.registry import parse_pattern
  from model.config import ConfigError
  if '|' in text:
    patterns = [p.strip() for p in text.split('|') if p.strip()]
  else:
    patterns, depth, current = [], 0, ''
    for ch in text:
      depth += {'(': 1, ')': -1}.get(ch, 0)
      if ch == ',' and depth == 0:
        patterns.append(current.strip())
        current = ''
      else:
        current += ch
    patterns.append(current.strip())
    patterns = [p for p in patterns if p]
  if not patterns:
    raise ConfigError('config.patterns is empty; give at least one, e.g. "attn:none*2"')
  for p in patterns:
    parse_pattern(p)  # raises ConfigError naming the entry
  return patterns


def model_config(config, pattern: str, corpus: str) -> ml_collections.ConfigDict:
  """One model's training config: the run sections, its pattern, the corpus."""
  c = ml_collections.ConfigDict({k: config[k].to_dict() for k in RUN_SECTIONS})
  c.model.pattern = pattern
  c.data.path = corpus
  return c


def train_model(config, workdir: str, pattern: str, corpus: str) -> list[dict]:
  """Trains (or resumes, or reuses) one model; its evaluation rows."""
  from experiments.induction import analysis
  from experiments.induction.probe import HeadProbe
  from train.loop import train_and_evaluate
  from train.progress import say
  run_dir = os.path.join(workdir, run_name(pattern))
  c = model_config(config, pattern, corpus)
  say(f'{pattern}: training {c.train.num_steps} steps in {run_dir}')
  train_and_evaluate(c, run_dir, evaluators=[HeadProbe(c, config.probe, run_dir,
                                                       config.corpus.text_path)])
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    return analysis.evaluation_rows([json.loads(line) for line in f])


def draw_heads(config, workdir: str, pattern: str, summary: dict, path: str) -> str | None:
  """The model's strongest induction head and its previous-token partner on a repeated random
  sequence of `probe.draw_period` tokens."""
  import jax
  import numpy as np

  from eval import heads
  from eval.attention import plot_heads, token_labels
  from train.restore import load_run
  from model.capture import attention_weights
  if summary.get('induction_head') is None:
    return None
  run = load_run(os.path.join(workdir, run_name(pattern)))
  tokens = heads.repeated_sequences(config.probe.seed + 1, 1, config.probe.draw_period,
                                    heads.probe_tokens(run.tokenizer))
  weights = jax.jit(lambda p, t: attention_weights(run.model, p, t))(run.params, tokens)
  panels = ([tuple(summary['previous_token_head'])] if summary.get('previous_token_head')
            else []) + [tuple(summary['induction_head'])]
  return plot_heads({layer: np.asarray(w[0]) for layer, w in weights.items()},
                    token_labels(run.tokenizer, tokens[0]), path,
                    f'{pattern} at step {run.step}: {config.probe.draw_period} random characters '
                    f'repeated', heads=panels)


def main(argv):
  del argv
  from experiments.induction import analysis, corpus, plots
  from train.progress import say
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  start = time.time()
  patterns = parse_patterns(config.patterns)
  corpus.check(config.corpus)
  path = corpus.write_corpus(config.corpus, config.corpus.text_path,
                             os.path.join(workdir, 'corpus'), config.data.tfds_data_dir)
  models, summaries = {}, {}
  for pattern in patterns:
    model_start = time.time()
    models[pattern] = train_model(config, workdir, pattern, path)
    summaries[pattern] = dict(analysis.summarize(models[pattern], config.probe.threshold),
                              wall_s=time.time() - model_start)
  plots.plot_scores(models, summaries, os.path.join(workdir, 'induction.png'))
  best = max((p for p in patterns if summaries[p]['induction_head'] is not None),
             key=lambda p: summaries[p]['max_induction_score'], default=None)
  if best is not None:
    draw_heads(config, workdir, best, summaries[best],
               os.path.join(workdir, 'induction_heads.png'))
  summary = {'models': summaries, 'wall_s': time.time() - start}
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  for pattern, s in summaries.items():
    score = s['max_induction_score']
    say(f'{pattern}: phase change at step {s["phase_change_step"]}, '
        + (f'max induction score {score:.3f} (head {s["induction_head"]}), ' if score is not None
           else '')
        + f'ICL score {s["icl_score"]:.3f}, second-copy loss {s["second_copy_loss"]:.3f}')
  say(f'wrote {workdir}/summary.json, induction.png, induction_heads.png in '
      f'{summary["wall_s"]:.0f} s')


if __name__ == '__main__':
  cli.command(main, 'Work directory: the corpus, one run per model, the summary and plots.',
              config='induction.py', makes='experiment')
