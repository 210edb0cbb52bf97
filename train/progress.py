"""What a user waiting on a command sees: the training progress bar, a line for each slow phase
("compiling the train step ... 4.1 s"), and a bar over long loops whose length is known.

On a terminal these are tqdm bars; otherwise (logs, CI) plain lines on stderr. On several
processes only process 0 prints.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar('T')
MIN_ITEMS = 20


def _chief() -> bool:
  import jax
  return jax.process_index() == 0


def say(message: str) -> None:
  """One line on stderr, from process 0."""
  if _chief():
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def phase(what: str) -> Iterator[None]:
  """'what ...' when it starts and its seconds when it ends: for work that is silent while it
  runs (compiling, reading a corpus, training a tokenizer). Off a terminal, the end gets a line
  of its own only when it took a second or more."""
  start = time.time()
  tty = sys.stderr.isatty()
  if _chief():
    print(f'{what} ...', file=sys.stderr, flush=True, end='' if tty else '\n')
  yield
  seconds = time.time() - start
  if _chief() and (tty or seconds >= 1.0):
    print(f' {seconds:.1f} s' if tty else f'{what}: {seconds:.1f} s', file=sys.stderr,
          flush=True)


def bar(items: Iterable[T], total: int, what: str, unit: str = 'batch') -> Iterator[T]:
  """`items` with a bar of `total` on a terminal, elsewhere a `phase`; nothing for fewer than
  `MIN_ITEMS` items, which pass too quickly to need one."""
  if not _chief() or total < MIN_ITEMS:
    yield from items
    return
  if sys.stderr.isatty():
    from tqdm import tqdm
    yield from tqdm(items, total=total, desc=what, unit=unit, leave=False, dynamic_ncols=True)
    return
  with phase(f'{what} ({total:,} {unit}{"es" if unit.endswith("ch") else "s"})'):
    yield from items


class Progress:
  """The training steps: a tqdm bar when stderr is a terminal; otherwise one line per update
  (readable in CI logs)."""

  def __init__(self, total: int, initial: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.total = total
    self._bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit='step')

  def update(self, step: int, **fields) -> None:
    if not self.enabled:
      return
    text = {k: (f'{v:.4g}' if isinstance(v, float) else v) for k, v in fields.items()}
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix(text, refresh=True)
    else:
      body = ' '.join(f'{k}={v}' for k, v in text.items())
      print(f'step {step}/{self.total} {body}', file=sys.stderr, flush=True)

  def write(self, message: str) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
