"""Configs compared as flat records, and the error a work directory that does not fit raises.
Nothing here imports JAX: experiments' stage records (experiments/stages.py) compare configs
before a command's --help would need it."""

from __future__ import annotations


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
