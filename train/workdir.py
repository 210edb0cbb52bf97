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
from typing import Callable

import ml_collections

from model.config import ModelConfig
from train import data as data_lib
from train import tokenizers
from train.progress import phase

CONFIG_FILE = 'config.json'
LOCK_FILE = 'lock'

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


class RunError(ValueError):
  """A work directory that does not fit the requested run; nothing in it was changed."""


def load_config(workdir: str) -> ml_collections.ConfigDict | None:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))


def flatten(d: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}; tuples become lists, as JSON reads them back."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = list(v) if isinstance(v, tuple) else v
  return out


def differences(old: dict, new: dict, keys=None) -> list[str]:
  """'key: old -> new' for every flattened key (of `keys`, when given) whose value differs."""
  old, new = flatten(old), flatten(new)
  keys = sorted(set(old) | set(new)) if keys is None else keys
  return [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in keys if old.get(k) != new.get(k)]


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
