"""Metrics to DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard event files
(DIR/tensorboard)."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np

from train.workdir import RunError


class MetricWriter:
  """Appends to metrics.jsonl and to TensorBoard event files. A run that starts at `start_step`
  (its restored checkpoint; 0 for a fresh start) first drops every row past it, from both, so
  that they read as one uninterrupted run: TensorBoard's events are rewritten from the rows kept
  (event files cannot be truncated, and TensorBoard would draw the dropped points twice)."""

  def __init__(self, workdir: str, start_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter
    kept = self._truncate_after(start_step)
    tb_dir = os.path.join(workdir, 'tensorboard')
    if os.path.isdir(tb_dir):
      shutil.rmtree(tb_dir)
    self._tb = SummaryWriter(tb_dir)
    for row in kept:
      self._add_scalars(row)
    self._tb.flush()

  def _truncate_after(self, step: int) -> list[dict]:
    """Keeps the rows of metrics.jsonl up to `step`; returns them. A last line cut short (the
    process was killed while writing it) is dropped with a warning: the step it logged is past
    the checkpoint the run resumes from anyway. A damaged line before it is refused."""
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        if number < len(lines):
          raise RunError(f'{self.path} line {number} is not JSON ({e}); repair or delete that '
                         f'line, then resume') from None
        print(f'warning: dropping the last line of {self.path}, cut short: {line.strip()[:60]!r}')
    kept = [row for row in rows if row['step'] <= step]
    with open(self.path, 'w') as f:
      f.writelines(json.dumps(row) + '\n' for row in kept)
    return kept

  def _add_scalars(self, row: dict) -> None:
    for key, value in row.items():
      if key != 'step' and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, row['step'])

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: _plain(v) for k, v in metrics.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    self._add_scalars(row)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _plain(value):
  if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, '__array__'):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value
