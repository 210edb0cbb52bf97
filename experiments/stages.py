"""One way of knowing that a stage of an experiment is done, and of redoing it when it is not.

A stage is a name, the config its outputs are made from (a JSON-able dict), its output paths and
the records of the stages it is made from (`after`). When its outputs are complete, a record,
DIR/stages/<name>.json, is written atomically: the config, the ids of the upstream records and a
new id of its own. The stage is done only when its outputs exist and its record holds the same
config and the same upstream ids: retraining SFT gives SFT's record a new id, so the DPO pairs
sampled from the old SFT model are stale even where no setting changed.

A stage that is not done is made again: its record and outputs are removed first, and its outputs
are written under temporary names, then renamed, so a refused or killed stage never leaves a
file that looks complete. A training run is written in place instead (`in_place`): the loop
resumes it from its checkpoint and refuses another model or data (train/workdir.py
check_compatible), and only the record says it finished. A sweep keeps its records where its
shards share them (experiments/sweep.py: runs.jsonl; the corpus's data.json, renamed into place
with it) and refuses a changed config instead of redoing what its finished runs rest on
(`check`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from typing import Any, Callable, Sequence

from train.progress import say
from train.records import RunError, differences, flatten, read_json

RECORDS = 'stages'  # DIR/stages/<name>.json

# Settings that change how a run reports, not what it computes: a finished stage still stands.
REPORTING_FIELDS = frozenset({
    'train.peak_flops', 'train.log_every', 'train.eval_every', 'train.eval_batches',
    'train.eval_batch_size', 'train.checkpoint_every', 'train.keep_checkpoints',
    'train.steps_per_call', 'data.tfds_data_dir', 'model.vocab_size'})


@dataclasses.dataclass(frozen=True)
class Stage:
  workdir: str                 # the experiment's: the record is DIR/stages/<name>.json
  name: str
  config: dict                 # JSON-able: everything the outputs are made from
  outputs: Sequence[str] = ()  # files or directories
  after: Sequence[dict] = ()   # the records of the stages it is made from
  ignore: frozenset = REPORTING_FIELDS  # config keys that do not change the outputs

  @property
  def record_path(self) -> str:
    return os.path.join(self.workdir, RECORDS, f'{self.name}.json')


def changes(stage: Stage, record: dict | None) -> list[str]:
  """Why `record` does not stand for the stage ([] when it does): the config fields that
  differ, the upstream stages made again since, the outputs missing."""
  if record is None:
    return ['not finished']
  old, new = flatten(record['config']), flatten(json.loads(json.dumps(stage.config)))
  keys = sorted(k for k in set(old) | set(new) if k not in stage.ignore)
  why = differences(old, new, keys)
  upstream = {r['name']: r['id'] for r in stage.after}
  made_from = record.get('after', {})
  why += [f'{name} was made again' for name in sorted(set(upstream) | set(made_from))
          if upstream.get(name) != made_from.get(name)]
  return why + [f'{path} is missing' for path in stage.outputs if not os.path.exists(path)]


def check(stage: Stage, record: dict, what: str) -> None:
  """Refuses (RunError, one line) a record made from another config: for outputs a user would
  lose by redoing them (a sweep's finished runs)."""
  why = changes(stage, record)
  if why:
    raise RunError(f'{what} with another config: {"; ".join(why)}. Use a new --workdir for a '
                   'new config.')


def saved(stage: Stage) -> dict | None:
  """The stage's record, or None (RunError, one line, for a record cut short)."""
  return read_json(stage.record_path)


def done(stage: Stage) -> dict | None:
  """The stage's record when its outputs stand for its config and its upstream records, else
  None."""
  record = saved(stage)
  return None if changes(stage, record) else record


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  elif os.path.lexists(path):
    os.remove(path)


def partial(path: str) -> str:
  """Where an output is written before it is complete."""
  return f'{path}.partial'


def run(stage: Stage, make: Callable[..., Any], in_place: bool = False) -> dict:
  """The stage's record: the saved one when the stage is done; otherwise `make(*paths)` makes
  the outputs at `paths` (temporary names, renamed once `make` returns; the outputs themselves
  when `in_place`) and its return value, JSON-able, is kept in the new record as 'result'."""
  record = saved(stage)
  why = changes(stage, record)
  if not why:
    say(f'{stage.name}: done earlier')
    return record
  if record is not None:
    say(f'{stage.name}: made again ({"; ".join(why)})')
    os.remove(stage.record_path)
    for path in stage.outputs:  # stale: a run in place starts afresh too
      _remove(path)
  if in_place:
    result = make(*stage.outputs)
  else:
    for path in stage.outputs:
      _remove(partial(path))  # a killed attempt's
      os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    result = make(*[partial(path) for path in stage.outputs])
    for path in stage.outputs:
      _remove(path)  # an output made by hand, or by a version that kept no record
      os.rename(partial(path), path)
  record = {'name': stage.name, 'id': uuid.uuid4().hex, 'config': stage.config,
            'after': {r['name']: r['id'] for r in stage.after}, 'result': result}
  os.makedirs(os.path.dirname(stage.record_path), exist_ok=True)
  scratch = partial(stage.record_path)
  with open(scratch, 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(scratch, stage.record_path)
  return json.loads(json.dumps(record))  # as a later run reads it back (tuples as lists)
