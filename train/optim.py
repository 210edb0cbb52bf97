"""The optimizer: optax AdamW behind global-norm clipping, with a warmup-then-decay schedule and
weight decay masked off parameters named in `train.weight_decay_exclude` (norm scales, biases,
the SSM's A_log and D) and off every parameter with fewer than two axes."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(tc, num_steps=None) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine or linear decay to `min_lr` at
  `num_steps` (the run's own budget, as Chinchilla found necessary), or constant.

  `num_steps` defaults to train.num_steps; it may be an array (traced): the schedule's length is
  then data, not a constant of the compiled step, so runs that differ only in their length (a
  scaling sweep's budgets) share one compiled program. The values are optax's
  `warmup_cosine_decay_schedule` / `join_schedules(linear, linear)` ones, written in jnp so that
  the length can be traced."""
  if tc.schedule not in ('cosine', 'linear', 'constant'):
    raise ValueError(f'train.schedule={tc.schedule!r} is not known; choose cosine, linear or '
                     f'constant')
  length = tc.num_steps if num_steps is None else num_steps
  lr, min_lr = tc.lr, tc.min_lr
  alpha = 0.0 if lr == 0.0 else min_lr / lr

  def schedule(count):
    # optax's operations in optax's order, so the values are the same to the bit.
    n = jnp.asarray(length, jnp.int32)
    warmup = jnp.minimum(jnp.int32(tc.warmup_steps), n)
    ramp = (0.0 - lr) * (1 - jnp.clip(count, 0, warmup) / warmup) + lr  # unused when warmup = 0
    after = count - warmup
    if tc.schedule == 'cosine':
      steps = (jnp.maximum(n, warmup + 1) - warmup).astype(jnp.float32)
      cosine = 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(after, steps) / steps))
      decay = lr * ((1 - alpha) * cosine + alpha)
    elif tc.schedule == 'linear':
      steps = jnp.maximum(n - warmup, 1)
      decay = (lr - min_lr) * (1 - jnp.clip(after, 0, steps) / steps) + min_lr
    else:
      decay = jnp.full(jnp.shape(count), lr, jnp.float32)
    return jnp.where(count < warmup, ramp, decay)
  return schedule


def decay_mask(params, exclude: Sequence[str]):
  """True where weight decay applies: matrices whose name is not excluded."""
  def decays(path, leaf):
    names = {getattr(k, 'key', None) for k in path}
    return leaf.ndim >= 2 and not names & set(exclude)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc, gradient_filter: optax.GradientTransformation | None = None,
                   num_steps=None) -> optax.GradientTransformation:
  """clip -> (optional gradient filter, e.g. Grokfast) -> AdamW, with the schedule of
  `learning_rate_schedule(tc, num_steps)`: its length may be traced, and the state's structure
  does not depend on it.

  A disabled clip is an identity in the same place, so changing train.grad_clip keeps the
  optimizer state's structure and a run can resume with it changed."""
  parts = [optax.clip_by_global_norm(tc.grad_clip) if tc.grad_clip > 0 else optax.identity()]
  if gradient_filter is not None:
    parts.append(gradient_filter)
  parts.append(optax.adamw(learning_rate_schedule(tc, num_steps), b1=tc.b1, b2=tc.b2, eps=tc.eps,
                           weight_decay=tc.weight_decay,
                           mask=lambda p: decay_mask(p, tuple(tc.weight_decay_exclude))))
  return optax.chain(*parts)
