"""Pure functions of one training step, several steps, and one evaluation batch.

A loss function (an objective's, train/objectives/) is

    loss_fn(params, batch, rng, frozen) -> (loss_sum, aux)

with aux = {'weight': what the sums are over (tokens, pairs, sequences), 'sums': {metric: its sum
over the batch}, 'layers': the model's per-layer metrics collection}. The step follows the
gradient of loss_sum / weight and reports each metric as sum / weight ('loss' among them): sums,
not means, so that micro-batches add up to the full batch exactly. `frozen` holds parameters that
are not trained, by role (train/state.py: 'start' for a reference model or LoRA's base, a
frozen model's name for a teacher), None when there are none.

Batches are dicts of (B, L) arrays, e.g. 'inputs', 'targets' and optionally 'weights' (the loss
mask: grokking puts weight only on the answer token, SFT on the assistant's tokens). The step's
metrics are arrays, so `lax.scan` can stack them across steps.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from model.blocks import AUX_LOSS, METRICS


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar: optimizer steps taken
  params: Any          # what the optimizer trains
  opt_state: Any
  frozen: Any = None   # parameters the step reads but does not train (not checkpointed)
  num_steps: Any = None  # int32 scalar: the schedule's length, as data (`make_train_step`)


def token_losses(logits_BxLxV, targets_BxL):
  """Cross-entropy per token, in float32. (B, L)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV.astype(jnp.float32),
                                                         targets_BxL)


def token_log_probs(logits_BxLxV, targets_BxL):
  """log p(target) per token, in float32. (B, L)."""
  return -token_losses(logits_BxLxV, targets_BxL)


def weights(batch):
  """The batch's loss mask: 'weights', or ones over the targets."""
  return batch.get('weights', jnp.ones(batch['targets'].shape, jnp.float32))


def aux_loss_sum(cols) -> jax.Array:
  """The layers' auxiliary losses (MoE load balancing, z-loss) of one forward pass, summed."""
  return sum((jnp.sum(x) for x in jax.tree.leaves(cols.get(AUX_LOSS, {}))), jnp.float32(0))


def cross_entropy_sums(logits_BxLxV, batch, weights_BxL, frozen):
  """Language modelling's loss: the summed cross-entropy of the weighted targets, as
  (loss sum, {metric: sum})."""
  del frozen
  ce_sum = jnp.sum(token_losses(logits_BxLxV, batch['targets']) * weights_BxL)
  return ce_sum, {'loss': ce_sum}


def make_loss_fn(model: nn.Module, dropout: bool, last_only: bool = False,
                 loss_sums: Callable = cross_entropy_sums):
  """A loss over the model's logits (`loss_sums(logits, batch, weights, frozen)` -> (loss sum,
  {metric: sum}); by default the cross-entropy), plus the layers' auxiliary losses per token.
  With `last_only` the loss is the last position's alone (answer-only tasks such as grokking's
  `a b =` -> `c`), and the model computes no more than that position needs (`LM(last_only)`)."""
  def loss_fn(params, batch, rng, frozen=None):
    logits, cols = model.apply(
        {'params': params}, batch['inputs'], deterministic=not dropout, last_only=last_only,
        rngs={'dropout': rng} if dropout else {}, mutable=[AUX_LOSS, METRICS])
    if last_only:
      batch = {k: v[:, -1:] for k, v in batch.items() if k in ('targets', 'weights')}
    w = weights(batch)
    loss_sum, sums = loss_sums(logits, batch, w, frozen)
    tokens = jnp.sum(w)
    aux_sum = aux_loss_sum(cols) * tokens
    return loss_sum + aux_sum, {'weight': tokens, 'sums': {**sums, 'aux_loss': aux_sum},
                                'layers': cols.get(METRICS, {})}
  return loss_fn


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, seed: int, grad_accum_steps: int = 1,
                    loss_fn: Callable | None = None, for_length: Callable | None = None):
  """step(state, batch) -> (state, metrics). With `grad_accum_steps` A > 1 the batch is split into
  A micro-batches of B / A rows whose gradients are summed before one optimizer update.

  With `for_length`, num_steps -> (optimizer, schedule), the step builds both from
  `state.num_steps` (traced): the schedule's length is an input of the compiled step rather than
  a constant in it, so runs that differ only in their length compile one program. `optimizer`
  then only has to match their state's structure."""
  loss_fn = loss_fn or make_loss_fn(model, dropout=model.config.dropout > 0)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  base_rng = jax.random.key(seed)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step)
    if grad_accum_steps == 1:
      (_, aux), grads = grad_fn(state.params, batch, rng, state.frozen)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
          batch)

      def accumulate(carry, mb_and_index):
        mb, i = mb_and_index
        (_, aux), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), state.frozen)
        return jax.tree.map(jnp.add, carry, (g, aux)), None

      aux_shapes = jax.eval_shape(loss_fn, state.params, jax.tree.map(lambda x: x[0], micro),
                                  rng, state.frozen)[1]
      zero = (jax.tree.map(jnp.zeros_like, state.params),
              jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes))
      (grads, aux), _ = jax.lax.scan(accumulate, zero,
                                     (micro, jnp.arange(grad_accum_steps)))
      aux = dict(aux, layers=jax.tree.map(lambda x: x / grad_accum_steps, aux['layers']))
    weight = jnp.maximum(aux['weight'], 1e-6)  # a batch with nothing to learn moves nothing
    grads = jax.tree.map(lambda g: g / weight, grads)
    optimizer_now, schedule_now = optimizer, schedule
    if for_length is not None:
      optimizer_now, schedule_now = for_length(state.num_steps)
    updates, opt_state = optimizer_now.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {name: value / weight for name, value in aux['sums'].items()}
    metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule_now(state.step),
                   layers=aux['layers'])
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_multi_step(step: Callable):
  """multi_step(state, batches) runs `step` over batches stacked on a leading axis (K, B, L) in
  one compiled call: one dispatch for K steps. Metrics come back stacked, (K, ...)."""
  def multi_step(state, batches):
    return jax.lax.scan(step, state, batches)
  return multi_step


def make_eval_fn(model: nn.Module):
  """The language-modelling evaluation: eval_fn(params, frozen, batch) -> {'loss': summed token
  losses over 'weights', 'weight': their number}."""
  def eval_fn(params, frozen, batch):
    del frozen
    logits = model.apply({'params': params}, batch['inputs'])
    w = weights(batch)
    return {'loss': jnp.sum(token_losses(logits, batch['targets']) * w), 'weight': jnp.sum(w)}
  return eval_fn
