"""A run's work directory: its resolved config (config.json), tokenizer, token caches and lock.

A run restarted in the same directory must build the same model on the same data:
`check_compatible` refuses a config whose model shape, tokenizer or data stream differs from the
saved one, before anything is written. Starting from another run's parameters with other data is
a separate, explicit choice (`train.init_from`, in a new directory). One process at a time trains
in a directory: `Lock` refuses a second one, and a killed process leaves no stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
from typing import Callable

import ml_collections

from model.config import ModelConfig
from train import data as data_lib
from train import tokenizers
from train.progress import phase
from train.records import RunError, differences, flatten, read_json  # noqa: F401  (RunError)

CONFIG_FILE = 'config.json'
LOCK_FILE = 'lock'
COMMAND_FILE = 'command.json'
# What a command makes at its --workdir: a training run (train.loop: config, tokenizer,
# checkpoints; what `eval`, `eval.sample` and `--init_from` read), or an experiment's own directory
# (its results, and its training runs in subdirectories).
RUN, EXPERIMENT = 'run', 'experiment'

# Model fields a resumed run may change: they do not change the parameter tree.
RESUMABLE_MODEL_FIELDS = {'dropout', 'attention_impl', 'attention_window', 'remat', 'dtype',
                          'init_std',
                          # RoPE stretched to a longer context: fine-tuning a shorter run
                          'rope_scaling', 'rope_factor', 'rope_original_len',
                          'moe.capacity_factor', 'moe.renormalize', 'moe.aux_loss_weight',
                          'moe.z_loss_weight',
                          'mamba.scan_impl', 'mamba.scan_chunk', 'mamba.dt_min', 'mamba.dt_max',
                          'mamba.dt_init_floor',
                          'mamba2.chunk_size', 'mamba2.dt_min', 'mamba2.dt_max',
                          'mamba2.dt_init_floor', 'mamba2.a_init_min', 'mamba2.a_init_max'}
# Fields that change which tokens the training iterator yields at a given step (or the tokenizer
# that makes them): a resumed run would train on other data than its checkpoint's data position
# refers to.
DATA_STREAM_FIELDS = ('data.path', 'data.tfds_name', 'data.text_key', 'data.train_split',
                      'data.val_split', 'data.val_fraction', 'data.tokenizer', 'data.vocab_size',
                      'data.seq_len', 'train.batch_size', 'train.seed')


def load_config(workdir: str) -> ml_collections.ConfigDict | None:
  saved = read_json(os.path.join(workdir, CONFIG_FILE))
  return None if saved is None else ml_collections.ConfigDict(saved)


def save_config(config: ml_collections.ConfigDict, workdir: str, kind: str = RUN) -> None:
  """DIR/config.json; and, the first time, which command made DIR and what kind it is (`RUN`
  for train.loop's runs, wherever they are, an experiment's subdirectories included)."""
  record_command(workdir, kind)
  with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# Which command made a directory: DIR/command.json, {"command": "experiments.grokking", "kind":
# "experiment"}. A command writes only into a directory it made itself (or a new one), and the
# commands that read a run read only training runs, so that no command overwrites another's
# files or crashes on them. Directories made before the record existed are judged by their files.


def running_command() -> str | None:
  """The `python -m` command of this process ('train', 'experiments.grokking'); None outside one
  of the project's commands (a test, a notebook), which records nothing."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  name = spec.name.removesuffix('.__main__') if spec else ''
  return name if name.split('.')[0] in ('train', 'eval', 'experiments') else None


def made_by(workdir: str) -> dict | None:
  """DIR/command.json's {'command', 'kind'}; None for a directory without one."""
  return read_json(os.path.join(workdir, COMMAND_FILE))


def record_command(workdir: str, kind: str, command: str | None = None) -> bool:
  """Writes DIR/command.json unless it exists (or no command runs); whether this call wrote it."""
  command = command or running_command()
  if command is None:
    return False
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, COMMAND_FILE)
  scratch = f'{path}.{os.getpid()}'
  with open(scratch, 'w') as f:
    json.dump({'command': command, 'kind': kind}, f)
  try:
    os.link(scratch, path)  # whole or not at all, and one writer even when two processes race
    return True
  except FileExistsError:
    return False
  finally:
    os.remove(scratch)


def _kind_from_files(workdir: str) -> str | None:
  """RUN for a directory without a record that holds a training run's files."""
  return RUN if os.path.isdir(os.path.join(workdir, 'checkpoints')) or os.path.isdir(
      os.path.join(workdir, 'tokenizer')) else None


def runs_below(workdir: str) -> list[str]:
  """The training runs in DIR's subdirectories (DIR/x, DIR/runs/x), where experiments keep
  theirs."""
  found = []
  for parent in (workdir, os.path.join(workdir, 'runs')):
    if not os.path.isdir(parent):
      continue
    for name in sorted(os.listdir(parent)):
      path = os.path.join(parent, name)
      if os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG_FILE)) and (
          (made_by(path) or {}).get('kind', _kind_from_files(path)) == RUN):
        found.append(path)
  return found


def check_command(workdir: str, command: str, makes: str | None) -> None:
  """Raises RunError, before anything is written, when `command` may not use `workdir`: one that
  makes a directory (`makes` RUN or EXPERIMENT) writes only into its own kind of directory made
  by itself; one that reads a run (`makes` None) reads only training runs (an experiment's own,
  in its subdirectories, included)."""
  record = made_by(workdir)
  kind = record['kind'] if record else _kind_from_files(workdir)
  other = f'python -m {record["command"]}' if record else 'python -m train (or an experiment)'
  what = {RUN: 'a training run', EXPERIMENT: 'an experiment\'s work directory'}
  if makes is None:
    config = os.path.exists(os.path.join(workdir, CONFIG_FILE))
    if kind == RUN or (record is None and not config and not runs_below(workdir)):
      return  # a run, or nothing at all (which the command itself reports)
    if record is None and config and not os.path.isdir(os.path.join(workdir, 'tokenizer')):
      raise RunError(f'{workdir} holds no training run: its {CONFIG_FILE} has no tokenizer/ or '
                     f'checkpoints/ beside it (an experiment\'s results, e.g. grokking\'s); give '
                     f'the --workdir of a python -m train run')
    runs = runs_below(workdir)
    where = (f'its training runs are {", ".join(runs)}: give one of them as --workdir' if runs
             else 'it holds no training run to read')
    maker = f'the work directory of python -m {record["command"]}' if record else (
        'an experiment\'s work directory')
    raise RunError(f'{workdir} is {maker}, not a training run; {where}')
  if record is None and (kind is None or kind == makes):
    return  # new, or made before directories recorded their command
  if record and record['command'] == command and kind == makes:
    return
  if record and record['command'] == command:
    raise RunError(f'{workdir} is {what[kind]} inside the work directory of python -m {command}; '
                   f'give {command} its own --workdir (the directory above), or a new one')
  raise RunError(f'{workdir} is {what[kind]} made by {other}; python -m {command} writes only '
                 f'into a directory it made, so nothing was changed: give it a new --workdir'
                 + (f' (with --init_from={workdir} to start from its parameters)'
                    if command == 'train' and kind == RUN else ''))


def model_differences(saved_model: dict, model: dict) -> list[str]:
  """The model fields that would change the parameter tree; vocab_size 0 (the tokenizer's) in
  `model` matches any saved size."""
  keys = sorted(k for k in set(flatten(saved_model)) | set(flatten(model))
                if k not in RESUMABLE_MODEL_FIELDS and k != 'vocab_size')
  diffs = [f'model.{d}' for d in differences(saved_model, model, keys)]
  if model.get('vocab_size') and model['vocab_size'] != saved_model.get('vocab_size'):
    diffs.append(f'model.vocab_size: {saved_model.get("vocab_size")} -> {model["vocab_size"]}')
  return diffs


def _stream(config) -> dict:
  """The data-stream fields, with the corpus path made absolute (the saved config holds it so)."""
  flat = {k: v for k, v in flatten(config.to_dict()).items() if k in DATA_STREAM_FIELDS}
  if flat.get('data.path'):
    flat['data.path'] = os.path.abspath(flat['data.path'])
  return flat


def check_compatible(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                     workdir: str) -> None:
  """Raises RunError naming every field that would change the model, its tokenizer or the data
  the resumed run trains on."""
  diffs = (model_differences(saved.model.to_dict(), config.model.to_dict())
           + differences(_stream(saved), _stream(config), DATA_STREAM_FIELDS))
  if diffs:
    raise RunError(f'{workdir} holds a run of another model or data, so resuming it with this '
                   f'config would not continue that run: ' + '; '.join(diffs)
                   + '. Use the config the run was started with; or a new --workdir, with '
                   f'--init_from={workdir} to start from its parameters.')


def resolve_model_config(model_section, vocab_size: int) -> ModelConfig:
  """The ModelConfig of a run: vocab_size 0 takes the tokenizer's; a larger one pads it."""
  section = dict(model_section.to_dict())
  if section['vocab_size'] and section['vocab_size'] < vocab_size:
    raise RunError(f'model.vocab_size={section["vocab_size"]} is smaller than the tokenizer\'s '
                   f'{vocab_size} ids; set it to 0 (take the tokenizer\'s) or larger')
  section['vocab_size'] = section['vocab_size'] or vocab_size
  return ModelConfig.from_dict(section)


def check_model_section(model_section) -> None:
  """Every model field, before the tokenizer (and so the vocabulary) is known."""
  section = dict(model_section.to_dict())
  ModelConfig.from_dict(dict(section, vocab_size=section['vocab_size'] or 1))


# ---------------------------------------------------------------------------------------------
# Tokenizer and token caches: DIR/tokenizer/ and DIR/data/{train,validation}.{npy,json}.


def load_data(workdir: str):
  """(tokenizer, train Split, validation Split) a previous start saved in `workdir`, or None."""
  tok_dir = os.path.join(workdir, 'tokenizer')
  splits = [data_lib.load_split(os.path.join(workdir, 'data', s)) for s in ('train', 'validation')]
  if not os.path.exists(tok_dir) or None in splits:
    return None
  return (tokenizers.load(tok_dir), *splits)


def build_data(config: ml_collections.ConfigDict, tokenizer=None):
  """(tokenizer, train Split, validation Split) from the corpus, in memory; the tokenizer is
  trained on the training split unless one is given (`train.init_from`'s)."""
  docs = data_lib.load_documents(config.data)
  if tokenizer is None:
    kind, size = config.data.tokenizer, config.data.vocab_size
    what = f'a {kind} tokenizer of {size:,} pieces' if kind in ('bpe', 'unigram') else (
        f'a {kind} tokenizer')
    with phase(f'training {what} on the training split'):
      tokenizer = tokenizers.train(kind, docs['train'], size)
  return (tokenizer, data_lib.tokenize(tokenizer, docs['train'], 'train'),
          data_lib.tokenize(tokenizer, _representable(tokenizer, docs['validation']),
                            'validation'))


def save_data(workdir: str, tokenizer, train_split, val_split) -> None:
  tokenizer.save(os.path.join(workdir, 'tokenizer'))
  os.makedirs(os.path.join(workdir, 'data'), exist_ok=True)
  data_lib.save_split(train_split, os.path.join(workdir, 'data', 'train'))
  data_lib.save_split(val_split, os.path.join(workdir, 'data', 'validation'))


def prepare_data(config: ml_collections.ConfigDict, workdir: str, write: bool = True):
  """`load_data`, else `build_data` (saved when `write`)."""
  prepared = load_data(workdir)
  if prepared is None:
    prepared = build_data(config)
    if write:
      save_data(workdir, *prepared)
  return prepared


def _representable(tokenizer, docs: list[str]) -> list[str]:
  """Validation text a character vocabulary (built on the training split) cannot encode loses
  those characters, with a warning; other tokenizers encode any text."""
  if tokenizer.kind != 'char':
    return docs
  known = set(tokenizer.chars)
  unknown = {c for d in docs for c in set(d)} - known
  if unknown:
    print(f'warning: dropping {len(unknown)} validation character(s) that the training split '
          f'lacks: {sorted(unknown)[:10]}')
    docs = [''.join(c for c in d if c in known) for d in docs]
  return docs


# ---------------------------------------------------------------------------------------------
# One training process per work directory.


class Lock:
  """An exclusive `flock` on DIR/lock, held while a run trains there. The kernel releases it when
  the process ends, however it ends (kill -9 included), so it never goes stale."""

  def __init__(self, workdir: str):
    path = os.path.join(workdir, LOCK_FILE)
    self._file = open(path, 'a+')
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or 'another process'
      self._file.close()
      raise RunError(f'{holder} is training in {workdir} now; two runs in one directory would '
                     f'overwrite each other\'s checkpoints. Wait for it to finish (or stop it), '
                     f'or use another --workdir.') from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f'process {os.getpid()} on {socket.gethostname()}')
    self._file.flush()

  def release(self) -> None:
    if not self._file.closed:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()


@contextlib.contextmanager
def undone_on_failure(workdir: str, keep: Callable[[], bool] = lambda: False,
                      enabled: bool = True):
  """Runs the block; when it raises and `keep()` is false (e.g. no checkpoint was written),
  removes what it created in `workdir`: the entries that were not there before, or the directory
  itself, with the parents made for it, when it did not exist. So a refused or failed new run
  leaves the directory as it found it, and the corrected command starts afresh there."""
  path = os.path.abspath(workdir)
  top = path  # the outermost directory that does not exist yet
  while not os.path.exists(os.path.dirname(top)):
    top = os.path.dirname(top)
  before = set(os.listdir(path)) if os.path.isdir(path) else None
  try:
    yield
  except BaseException:
    if enabled and not keep():
      if before is None:
        shutil.rmtree(top, ignore_errors=True)
      else:
        for name in set(os.listdir(path)) - before:
          entry = os.path.join(path, name)
          if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry, ignore_errors=True)
          else:
            os.remove(entry)
    raise
