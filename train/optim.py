"""The optimizer: optax AdamW behind global-norm clipping, with a warmup-then-decay schedule and
weight decay masked off parameters named in `train.weight_decay_exclude` (norm scales, biases,
the SSM's A_log and D) and off every parameter with fewer than two axes."""

from __future__ import annotations

from typing import Sequence

import jax
import optax


def learning_rate_schedule(tc) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine or linear decay to `min_lr` at
  `num_steps` (the run's own budget, as Chinchilla found necessary), or constant."""
  warmup = min(tc.warmup_steps, tc.num_steps)
  if tc.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.num_steps, warmup + 1),
                                              end_value=tc.min_lr)
  ramp = optax.linear_schedule(0.0, tc.lr, warmup)
  if tc.schedule == 'linear':
    decay = optax.linear_schedule(tc.lr, tc.min_lr, max(tc.num_steps - warmup, 1))
  elif tc.schedule == 'constant':
    decay = optax.constant_schedule(tc.lr)
  else:
    raise ValueError(f'train.schedule={tc.schedule!r} is not known; choose cosine, linear or '
                     f'constant')
  return optax.join_schedules([ramp, decay], [warmup])


def decay_mask(params, exclude: Sequence[str]):
  """True where weight decay applies: matrices whose name is not excluded."""
  def decays(path, leaf):
    names = {getattr(k, 'key', None) for k in path}
    return leaf.ndim >= 2 and not names & set(exclude)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc, gradient_filter: optax.GradientTransformation | None = None
                   ) -> optax.GradientTransformation:
  """clip -> (optional gradient filter, e.g. Grokfast) -> AdamW.

  A disabled clip is an identity in the same place, so changing train.grad_clip keeps the
  optimizer state's structure and a run can resume with it changed."""
  parts = [optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip > 0 else optax.identity()]
  if gradient_filter is not None:
    parts.append(gradient_filter)
  parts.append(optax.adamw(learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                           weight_decay=tc.weight_decay,
                           mask=lambda p: decay_mask(p, tuple(tc.weight_decay_exclude))))
  return optax.chain(*parts)
