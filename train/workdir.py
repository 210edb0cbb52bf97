"""A run's work directory: its resolved config (config.json), tokenizer and token caches.

A run restarted in the same directory must build the same model: `check_compatible` refuses a
config whose model shape or tokenizer differs from the saved one, before anything is written.
"""

from __future__ import annotations

import json
import os

import ml_collections

from model.config import ModelConfig
from train import data as data_lib
from train import tokenizers

CONFIG_FILE = 'config.json'

# Model fields a resumed run may change: they do not change the parameter tree.
RESUMABLE_MODEL_FIELDS = {'dropout', 'attention_impl', 'attention_window', 'remat', 'dtype',
                          'init_std',
                          'moe.capacity_factor', 'moe.renormalize', 'moe.aux_loss_weight',
                          'moe.z_loss_weight',
                          'mamba.scan_impl', 'mamba.scan_chunk', 'mamba.dt_min', 'mamba.dt_max',
                          'mamba.dt_init_floor'}


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


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = list(v) if isinstance(v, tuple) else v
  return out


def check_compatible(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                     workdir: str) -> None:
  """Raises RunError naming every field that would change the model or its tokenizer."""
  old, new = _flat(saved.model.to_dict()), _flat(config.model.to_dict())
  diffs = [f'model.{k}: {old.get(k)!r} -> {new.get(k)!r}'
           for k in sorted(set(old) | set(new))
           if k not in RESUMABLE_MODEL_FIELDS and k != 'vocab_size' and old.get(k) != new.get(k)]
  if config.model.vocab_size and config.model.vocab_size != saved.model.vocab_size:
    diffs.append(f'model.vocab_size: {saved.model.vocab_size} -> {config.model.vocab_size}')
  for k in ('tokenizer', 'vocab_size'):
    if saved.data[k] != config.data[k]:
      diffs.append(f'data.{k}: {saved.data[k]!r} -> {config.data[k]!r}')
  if diffs:
    raise RunError(f'{workdir} holds a run of a different model or tokenizer, so its checkpoints '
                   f'cannot be resumed with this config: ' + '; '.join(diffs)
                   + '. Use a new --workdir, or the config the run was started with.')


def resolve_model_config(model_section, vocab_size: int) -> ModelConfig:
  """The ModelConfig of a run: vocab_size 0 takes the tokenizer's; a larger one pads it."""
  section = dict(model_section.to_dict())
  if section['vocab_size'] and section['vocab_size'] < vocab_size:
    raise RunError(f'model.vocab_size={section["vocab_size"]} is smaller than the tokenizer\'s '
                   f'{vocab_size} ids; set it to 0 (take the tokenizer\'s) or larger')
  section['vocab_size'] = section['vocab_size'] or vocab_size
  return ModelConfig.from_dict(section)


def prepare_data(config: ml_collections.ConfigDict, workdir: str, write: bool = True):
  """(tokenizer, train Split, validation Split): loaded from the work directory when a previous
  start saved them, else built from the corpus (and saved when `write`)."""
  tok_dir = os.path.join(workdir, 'tokenizer')
  cache = os.path.join(workdir, 'data')
  train_split = data_lib.load_split(os.path.join(cache, 'train'))
  val_split = data_lib.load_split(os.path.join(cache, 'validation'))
  tokenizer = tokenizers.load(tok_dir) if os.path.exists(tok_dir) else None
  if tokenizer is not None and train_split is not None and val_split is not None:
    return tokenizer, train_split, val_split
  docs = data_lib.load_documents(config.data)
  if tokenizer is None:
    tokenizer = tokenizers.train(config.data.tokenizer, docs['train'], config.data.vocab_size)
  train_split = data_lib.tokenize(tokenizer, docs['train'])
  val_split = data_lib.tokenize(tokenizer, _representable(tokenizer, docs['validation']))
  if write:
    tokenizer.save(tok_dir)
    os.makedirs(cache, exist_ok=True)
    data_lib.save_split(train_split, os.path.join(cache, 'train'))
    data_lib.save_split(val_split, os.path.join(cache, 'validation'))
  return tokenizer, train_split, val_split


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
