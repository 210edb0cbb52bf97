"""Compiled programs shared by the runs of one process.

A scaling sweep's runs of one model size lower to the same program (the schedule's length is an
input of the step, `train.optim.learning_rate_schedule`), so the second and later runs take the
first one's executable instead of compiling it again. The key is the lowered program's text (its
shapes, shardings, donations and constants), the structure of its inputs and the devices it runs
on: two programs that share a key are the same program. (The text alone is not enough: inputs
the program never reads are left out of it, so an evaluation that ignores a distillation
teacher's parameters lowers to the text of one that has none, and the executable of one refuses
the other's inputs.)
"""

from __future__ import annotations

import collections
import hashlib

from jax.sharding import Mesh

MAX_PROGRAMS = 16  # a sweep's model sizes, each with its train calls and evaluation
_programs: collections.OrderedDict = collections.OrderedDict()


def compile(lowered, mesh: Mesh, options: dict | None = None):  # pylint: disable=redefined-builtin
  """`lowered.compile(options)`, or the executable an identical program compiled to before."""
  key = hashlib.sha256(lowered.as_text().encode()).hexdigest(), str(lowered.in_tree), \
      tuple(d.id for d in mesh.devices.flat), tuple(sorted((options or {}).items()))
  if key in _programs:
    _programs.move_to_end(key)
    return _programs[key]
  executable = lowered.compile(options) if options else lowered.compile()
  _programs[key] = executable
  while len(_programs) > MAX_PROGRAMS:
    _programs.popitem(last=False)
  return executable


def clear() -> None:
  """Forgets every kept program (tests that count compilations start from none)."""
  _programs.clear()
