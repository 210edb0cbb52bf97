"""Checks of a run's `train` and `data` config sections, done at start-up before anything is read
or written: a wrong value fails as one ConfigError naming the field, the value and the fix (the
`model` section has its own in model/config.py).

Each check applies to the fields a section has, so configs with a smaller `train` section (the
grokking experiment's) are checked by the same table.
"""

from __future__ import annotations

from typing import Any, Callable

from model.config import ConfigError
from train import tokenizers

SCHEDULES = ('cosine', 'linear', 'constant')


def _int(low: int, meaning: str) -> Callable[[Any], str | None]:
  """A whole number >= low."""
  def check(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      return f'must be a whole number >= {low} ({meaning})'
    return None
  return check


def _number(low: float, high: float | None = None, meaning: str = '',
            high_open: bool = True) -> Callable[[Any], str | None]:
  """A number in [low, high) (or [low, high] when not high_open; no upper bound when None)."""
  def check(value):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
      ok = value < high if high_open else value <= high
    if not ok:
      span = f'>= {low}' if high is None else f'in [{low}, {high}{")" if high_open else "]"}'
      return f'must be a number {span}' + (f' ({meaning})' if meaning else '')
    return None
  return check


def _choice(choices) -> Callable[[Any], str | None]:
  def check(value):
    return None if value in choices else f'is not known; choose one of {list(choices)}'
  return check


TRAIN_CHECKS: dict[str, Callable[[Any], str | None]] = {
    'num_steps': _int(1, 'the optimizer steps of the run'),
    'batch_size': _int(1, 'sequences per step'),
    'grad_accum_steps': _int(1, 'micro-batches per step'),
    'lr': _number(0.0, meaning='the peak learning rate'),
    'min_lr': _number(0.0, meaning='the learning rate at the end of the decay'),
    'warmup_steps': _int(0, 'steps of linear warmup'),
    'schedule': _choice(SCHEDULES),
    'b1': _number(0.0, 1.0, "Adam's first-moment decay"),
    'b2': _number(0.0, 1.0, "Adam's second-moment decay"),
    'eps': _number(0.0, meaning="Adam's epsilon, > 0 in practice"),
    'weight_decay': _number(0.0, meaning='0 switches it off'),
    'grad_clip': _number(0.0, meaning='the global gradient norm; 0 switches clipping off'),
    'seed': _int(0, 'of the initialisation and the data order'),
    'steps_per_call': _int(1, 'steps per compiled call'),
    'log_every': _int(1, 'steps between metric rows'),
    'eval_every': _int(0, 'steps between evaluations; 0: only at the end'),
    'eval_batches': _int(1, 'batches of a periodic evaluation; the last one reads the whole '
                            'split'),
    'eval_batch_size': _int(1, 'sequences per evaluation batch'),
    'checkpoint_every': _int(0, 'steps between checkpoints; 0: only at the end'),
    'keep_checkpoints': _int(1, 'checkpoints kept on disk'),
    'peak_flops': _number(0.0, meaning='FLOP/s for MFU; 0 measures it'),
}

DATA_CHECKS: dict[str, Callable[[Any], str | None]] = {
    'tokenizer': _choice(tokenizers.KINDS),
    'vocab_size': _int(0, 'of a bpe or unigram tokenizer'),
    'seq_len': _int(1, 'tokens per training sequence'),
    'val_fraction': _number(0.0, 1.0, "the share of each file's characters held out"),
}


def _check_section(section, name: str, checks: dict) -> None:
  for field, check in checks.items():
    if field in section:
      problem = check(section[field])
      if problem:
        raise ConfigError(f'{name}.{field}={section[field]!r} {problem}')


def check_train(tc) -> None:
  """Raises ConfigError for the first invalid field of a `train` section."""
  _check_section(tc, 'train', TRAIN_CHECKS)
  if 'min_lr' in tc and 'lr' in tc and tc.min_lr > tc.lr:
    raise ConfigError(f'train.min_lr={tc.min_lr!r} is above train.lr={tc.lr!r}: the schedule '
                      f'decays from lr to min_lr, so give a min_lr <= lr (e.g. lr / 10)')
  if 'grad_accum_steps' in tc and tc.batch_size % tc.grad_accum_steps:
    raise ConfigError(f'train.grad_accum_steps={tc.grad_accum_steps} does not divide '
                      f'train.batch_size={tc.batch_size}; each micro-batch takes batch_size / '
                      f'grad_accum_steps rows, so pick a divisor')


def check_data(dc) -> None:
  """Raises ConfigError for the first invalid field of a `data` section."""
  _check_section(dc, 'data', DATA_CHECKS)
  if dc.get('val_fraction') == 0:
    raise ConfigError('data.val_fraction=0 holds out nothing, and a run needs a validation split '
                      '(for its evaluations and the final loss); give a fraction in (0, 1), e.g. '
                      '0.1')
  if not (dc.path or dc.tfds_name or dc.tfds_fallback):
    raise ConfigError('no corpus configured: set --config.data.path to a text file or directory, '
                      'or --config.data.tfds_name to a TFDS catalog dataset')
  if dc.tfds_name and not dc.text_key:
    raise ConfigError(f'data.text_key is empty; name the text feature of {dc.tfds_name!r}')
  if dc.tokenizer in ('bpe', 'unigram') and not dc.vocab_size:
    raise ConfigError(f'data.tokenizer={dc.tokenizer!r} needs data.vocab_size, the number of '
                      f'pieces to learn (e.g. 8192)')


def check_run_config(config) -> None:
  """The `train` and `data` sections of a `python -m train` config."""
  check_train(config.train)
  check_data(config.data)
