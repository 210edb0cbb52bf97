"""What the induction experiment reads off each model's metrics: the phase change and the heads.

A model's evaluation rows (metrics.jsonl rows with the probe's metrics, experiments/induction/
probe.py) give
  phase_change_step   the first evaluation at which the strongest head's induction score reaches
                      `threshold` (0.5 by default; the issue's bar), None if it never does
  rise                (last step below 10%, first step at or above 90%) of the way from the
                      first evaluation's max induction score to the highest: how short the
                      window in which the head forms is
  induction_head      [layer, head] of the highest induction score at the last evaluation, and
                      previous_token_head, the earlier-layer head with the highest previous-token
                      score (its K-composition partner), when there is an earlier layer
"""

from __future__ import annotations

import re

import numpy as np

from eval import heads

THRESHOLD = 0.5


def evaluation_rows(rows: list[dict]) -> list[dict]:
  """The rows that hold the probe's metrics (the evaluations), in step order."""
  return sorted((r for r in rows if 'second_copy_loss' in r), key=lambda r: r['step'])


def head_table(row: dict, name: str) -> np.ndarray | None:
  """(layers, H) of `name` ('induction' or 'previous_token') from a row's flat metrics, NaN for
  heads not reported; None when the model has no heads."""
  found = {}
  for key, value in row.items():
    m = re.fullmatch(rf'{name}/layer_(\d+)/head_(\d+)', key)
    if m:
      found[int(m[1]), int(m[2])] = value
  if not found:
    return None
  table = np.full((max(l for l, _ in found) + 1, max(h for _, h in found) + 1), np.nan)
  for (layer, head), value in found.items():
    table[layer, head] = value
  return table


def phase_change_step(rows: list[dict], threshold: float = THRESHOLD) -> int | None:
  return next((r['step'] for r in rows if r.get('max_induction_score', 0.0) >= threshold), None)


def rise(rows: list[dict], low: float = 0.1, high: float = 0.9) -> tuple[int, int] | None:
  """(last step below `low`, first step at or above `high`) of the way from the first max
  induction score to the highest; None without heads."""
  scores = [r.get('max_induction_score') for r in rows]
  if not rows or scores[0] is None:
    return None
  start, top = scores[0], max(scores)
  if top - start <= 0:
    return None
  frac = [(s - start) / (top - start) for s in scores]
  end = next(i for i, f in enumerate(frac) if f >= high)
  begin = max((i for i in range(end) if frac[i] < low), default=0)
  return rows[begin]['step'], rows[end]['step']


def summarize(rows: list[dict], threshold: float = THRESHOLD) -> dict:
  """The summary.json entry of one model."""
  rows = evaluation_rows(rows)
  last = rows[-1]
  out = {'phase_change_step': phase_change_step(rows, threshold),
         'max_induction_score': last.get('max_induction_score'),
         'induction_head': None, 'previous_token_head': None,
         'icl_score': last['icl_score'], 'icl_score_text': last.get('icl_score_text'),
         'second_copy_loss': last['second_copy_loss'],
         'first_copy_loss': last['first_copy_loss'],
         'final_step': last['step'], 'val_loss': last.get('val_loss')}
  rising = rise(rows)
  out['rise_window'] = list(rising) if rising else None
  induction = head_table(last, 'induction')
  if induction is not None:
    out['peak_max_induction_score'] = max(r['max_induction_score'] for r in rows)
    layer, head = heads.strongest(induction)
    out['induction_head'] = [layer, head]
    previous = head_table(last, 'previous_token')
    if layer > 0 and previous is not None:
      earlier = previous[:layer]
      if np.isfinite(earlier).any():
        out['previous_token_head'] = list(heads.strongest(earlier))
        out['previous_token_score'] = float(np.nanmax(earlier))
  return out
