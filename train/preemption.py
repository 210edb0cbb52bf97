"""Ctrl-C and SIGTERM end a run cleanly: at the end of the compiled call in flight, with a
checkpoint of that step, so that the same command resumes it. Cloud TPU and GPU nodes that are
preempted get SIGTERM first; a second signal stops at once.

    with StopRequest() as stop:
      while ...:
        state = call(state)
        if stop.requested():
          save(step)
          raise Interrupted(step, stop.signum)
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
  """A run stopped by a signal after saving its checkpoint; `exit_code` is 128 + the signal."""

  def __init__(self, step: int, signum: int):
    super().__init__(f'interrupted by {signal.Signals(signum).name} at step {step}; checkpoint '
                     f'saved; run the same command to resume')
    self.step = step
    self.exit_code = 128 + signum


class StopRequest:
  """Catches SIGINT and SIGTERM while active (in the main thread; elsewhere it catches nothing)
  and remembers the first one; the next one gets the default behaviour back."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self) -> 'StopRequest':
    if threading.current_thread() is threading.main_thread():
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    self.signum = signum
    for s, handler in self._previous.items():  # a second signal is not caught
      signal.signal(s, handler)

  def requested(self) -> bool:
    """Whether any process got a signal: every process of a multi-host run then stops at the
    same step, so that they write one checkpoint together."""
    mine = self.signum or 0
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      signums = np.asarray(multihost_utils.process_allgather(np.int32(mine)))
      mine = int(signums.max())
      self.signum = self.signum or mine or None
    return bool(mine)
