"""The grid driver every sweep shares (experiments.scaling, experiments.recall).

A sweep is a list of named points, each a training config. A finished point appends one row to
DIR/runs.jsonl; running the sweep again skips the points that have a row (after checking, with
experiments/stages.py, that the row came from the same config) and resumes an interrupted one
from its checkpoint (the training loop does that in DIR/runs/<name>); `--shard=i/n` takes every
n-th point from the i-th, so n processes (or hosts) share a grid and its runs.jsonl.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

from experiments import stages
from train.progress import say

RUNS_FILE = 'runs.jsonl'


class SweepError(ValueError):
  """A sweep command that cannot go on as given; the message says what to change."""


def parse_shard(text: str) -> tuple[int, int]:
  try:
    index, count = (int(x) for x in text.split('/'))
  except ValueError:
    index, count = -1, 0
  if not 0 <= index < count:
    raise SweepError(f'--shard={text!r}: write i/n with 0 <= i < n, e.g. --shard=0/4')
  return index, count


def read_runs(workdir: str) -> dict[str, dict]:
  """The rows of DIR/runs.jsonl by run name (a later row of a name replaces an earlier one)."""
  path = os.path.join(workdir, RUNS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {row['name']: row for row in rows}


def append_run(workdir: str, row: dict) -> None:
  """One line in one write to a file opened for appending: shards sharing runs.jsonl do not
  interleave their rows."""
  fd = os.open(os.path.join(workdir, RUNS_FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, (json.dumps(row) + '\n').encode())
  finally:
    os.close(fd)


def run_grid(points: Sequence[Any], workdir: str, shard: tuple[int, int],
             run: Callable[[Any, str], dict], describe: Callable[[Any], str] = str,
             before: Callable[[list], None] | None = None) -> tuple[dict[str, dict], list[str]]:
  """Runs this shard's unfinished points, in order; returns (the rows of runs.jsonl by name, the
  names of the grid's points still without a row). Each point has `.name` and `.config`;
  `run(point, run_dir)` trains it in DIR/runs/<name> and returns its row, which the chief
  process appends to runs.jsonl. `before(todo)`, if given, sees the points to run first (to print
  a plan, or measure what every run shares)."""
  import jax
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  done = read_runs(workdir)
  mine = list(points)[shard[0]::shard[1]]
  for p in mine:
    if p.name in done:  # a finished row must come from the same config: results never mix
      stages.check(stages.Stage(workdir, p.name, p.config.to_dict()),
                   done[p.name], f'{workdir} already holds run {p.name}')
  todo = [p for p in mine if p.name not in done]
  say(f'sweep: {len(points)} runs in the grid, {len(mine)} in shard {shard[0]}/{shard[1]}, '
      f'{len(todo)} to run')
  if todo and before is not None:
    before(todo)
  chief = jax.process_index() == 0
  for i, p in enumerate(todo):
    say(f'[{i + 1}/{len(todo)}] {p.name}: {describe(p)}')
    row = run(p, os.path.join(workdir, 'runs', p.name))
    if chief:
      append_run(workdir, row)
  say(f'sweep: {len(todo)} runs in {time.time() - start:.0f}s')
  done = read_runs(workdir)
  return done, [p.name for p in points if p.name not in done]
