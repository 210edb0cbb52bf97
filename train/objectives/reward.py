"""A reward model: the LM with a scalar head, scored at the last token of an answer, trained on
preference pairs with the Bradley-Terry loss (Ouyang et al. 2022; Bradley & Terry 1952):

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))

Metrics: pairwise accuracy (r_chosen > r_rejected), the margin r_chosen - r_rejected, and the
rewards themselves. It usually starts from an SFT run (train.init_from), whose parameters it
takes; the head starts at random.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.blocks import AUX_LOSS, METRICS
from train.objectives.preferences import PreferenceObjective, both_sides, halves, pair_loss


def bradley_terry_loss(chosen, rejected):
  """-log sigmoid(chosen - rejected), elementwise."""
  return -jax.nn.log_sigmoid(chosen - rejected)


def answer_scores(model, params, batch, rng=None, dropout: bool = False):
  """(scores of the chosen answers (B,), of the rejected (B,), the forward pass's collections)."""
  rows = both_sides(batch)
  scores_2BxL, cols = model.apply(
      {'params': params}, rows['inputs'], head='scalar', deterministic=not dropout,
      rngs={'dropout': rng} if dropout else {}, mutable=[AUX_LOSS, METRICS])
  last = jnp.take_along_axis(scores_2BxL, rows['last'][:, None], axis=1)[:, 0]
  chosen, rejected = halves(last)
  return chosen, rejected, cols


def pair_sums(chosen, rejected, valid) -> dict:
  return {'loss': jnp.sum(bradley_terry_loss(chosen, rejected) * valid),
          'accuracy': jnp.sum((chosen > rejected) * valid),
          'margin': jnp.sum((chosen - rejected) * valid),
          'reward_chosen': jnp.sum(chosen * valid), 'reward_rejected': jnp.sum(rejected * valid)}


class RewardModel(PreferenceObjective):
  name = 'reward'
  head = 'scalar'

  def loss_fn(self, model):
    dropout = model.config.dropout > 0

    def loss_fn(params, batch, rng, frozen=None):
      del frozen
      chosen, rejected, cols = answer_scores(model, params, batch, rng, dropout)
      return pair_loss(pair_sums(chosen, rejected, batch['valid']), cols, batch['valid'])
    return loss_fn

  def eval_fn(self, model):
    def eval_fn(params, frozen, batch):
      del frozen
      chosen, rejected, _ = answer_scores(model, params, batch)
      return dict(pair_sums(chosen, rejected, batch['valid']), weight=jnp.sum(batch['valid']))
    return eval_fn

  def summarize(self, sums: dict, data) -> dict:
    n = sums['weight']
    return {f'val_{k}': sums[k] / n for k in ('loss', 'accuracy', 'margin', 'reward_chosen',
                                               'reward_rejected')} | {'val_pairs': int(n)}
