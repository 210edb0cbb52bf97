"""Rewards for reinforcement learning: a Python function named in the config, or a reward model.

`rl.reward='module:function'` names a function called for every sampled answer as

    function(prompt=<the prompt's text>, response=<the answer's text>, **fields) -> float

where `fields` are the other fields of the prompt's JSON line (e.g. the arithmetic task's
"answer"). The arithmetic task's exact match ships with the project:
`experiments.posttrain.task:exact_match`. A function that raises, or returns something that is
not a finite number, stops the run with an error naming the example.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

from model.config import ConfigError


class RewardError(ValueError):
  """A reward function that failed or returned a non-number; the message names the example."""


def load(spec: str) -> Callable[..., float]:
  """The function `spec` ('module:function') names."""
  module_name, _, name = spec.partition(':')
  if not module_name or not name:
    raise ConfigError(f'rl.reward={spec!r}: write module:function, e.g. '
                      f'experiments.posttrain.task:exact_match')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f'rl.reward={spec!r}: cannot import {module_name!r} ({e})') from None
  fn = getattr(module, name, None)
  if not callable(fn):
    raise ConfigError(f'rl.reward={spec!r}: {module_name} has no function {name!r}')
  return fn


def score(fn: Callable[..., float], prompt: str, response: str, fields: dict,
          where: str) -> float:
  """fn's reward for one answer, checked: a finite number, or a RewardError naming `where`."""
  try:
    value = fn(prompt=prompt, response=response, **fields)
  except Exception as e:  # the user's function: any failure is reported, with the example
    raise RewardError(f'the reward function failed on {where} (prompt {prompt!r}, response '
                      f'{response!r}): {type(e).__name__}: {e}') from e
  try:
    value = float(value)
  except (TypeError, ValueError):
    value = None
  if value is None or not math.isfinite(value):
    raise RewardError(f'the reward function returned {value!r} for {where} (prompt {prompt!r}, '
                      f'response {response!r}); it must return a finite number')
  return value
