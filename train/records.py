"""Configs compared as flat records, JSON records read back, and the error a work directory that
does not fit raises. Nothing here imports JAX: experiments' stage records (experiments/stages.py)
use it before a command's --help would need JAX."""

from __future__ import annotations

import json
import os


class RunError(ValueError):
  """A work directory that does not fit the requested run; nothing in it was changed."""


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


def read_json(path: str) -> dict | None:
  """The JSON object in `path`, None when there is no such file; RunError when it is not JSON
  (e.g. cut short by a kill or a full disk)."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise RunError(f'{path} is not valid JSON ({e}); it was cut short or edited. Restore it, '
                     f'or delete it and rerun the command that made the directory with the '
                     f'config it was started with (it is written again)') from None
