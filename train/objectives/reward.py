"""A reward model: the LM with a scalar head, scored at the last token of an answer, trained on
preference pairs with the Bradley-Terry loss (Ouyang et al. 2022; Bradley & Terry 1952):

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))

Metrics: pairwise accuracy (r_chosen > r_rejected), the margin r_chosen - r_rejected, and the
rewards themselves. It usually starts from an SFT run (train.init_from), whose parameters it
takes; the head starts at random.

`reward.lm_weight` (lambda) adds the chosen answer's mean next-token loss per token, lambda x
-log p(y_c|x) / |y_c|, through the LM head the trunk keeps: the regulariser of Yang et al. 2024
("Regularizing Hidden States Enables Learning Generalizable Reward Models"). The Bradley-Terry
loss alone sees one bit per pair; the text loss goes on teaching the trunk what a right answer
is, which the scalar head reads. 0 is the plain reward model (and skips the LM head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.blocks import AUX_LOSS, METRICS
from model.config import ConfigError
from train import step as step_lib
from train.objectives.preferences import (PreferenceObjective, both_sides, chosen_mean_nll,
                                          halves, pair_loss)


def bradley_terry_loss(chosen, rejected):
  """-log sigmoid(chosen - rejected), elementwise."""
  return -jax.nn.log_sigmoid(chosen - rejected)


def answer_scores(model, params, batch, rng=None, dropout: bool = False, lm: bool = False):
  """(scores of the chosen answers (B,), of the rejected (B,), the chosen answers' mean
  next-token loss per token (B,) when `lm` (else None), the forward pass's collections)."""
  rows = both_sides(batch)
  out, cols = model.apply(
      {'params': params}, rows['inputs'], head='both' if lm else 'scalar',
      deterministic=not dropout, rngs={'dropout': rng} if dropout else {},
      mutable=[AUX_LOSS, METRICS])
  chosen_nll = None
  if lm:
    logits_2BxLxV, scores_2BxL = out
    # Only the chosen half counts: the rejected answers are not text to learn.
    log_probs_2B = jnp.sum(step_lib.token_log_probs(logits_2BxLxV, rows['targets'])
                           * rows['weights'], axis=-1)
    chosen_nll = chosen_mean_nll(log_probs_2B, rows)
  else:
    scores_2BxL = out
  last = jnp.take_along_axis(scores_2BxL, rows['last'][:, None], axis=1)[:, 0]
  chosen, rejected = halves(last)
  return chosen, rejected, chosen_nll, cols


def pair_sums(chosen, rejected, valid, chosen_nll=None, lm_weight: float = 0.0) -> dict:
  losses = bradley_terry_loss(chosen, rejected)
  sums = {'accuracy': jnp.sum((chosen > rejected) * valid),
          'margin': jnp.sum((chosen - rejected) * valid),
          'reward_chosen': jnp.sum(chosen * valid), 'reward_rejected': jnp.sum(rejected * valid)}
  if chosen_nll is not None:
    losses = losses + lm_weight * chosen_nll
    sums['chosen_nll'] = jnp.sum(chosen_nll * valid)
  sums['loss'] = jnp.sum(losses * valid)
  return sums


class RewardModel(PreferenceObjective):
  name = 'reward'
  head = 'scalar'

  def check(self) -> None:
    super().check()
    if self.config.reward.lm_weight < 0:
      raise ConfigError(f'reward.lm_weight={self.config.reward.lm_weight} must be >= 0')

  def loss_fn(self, model):
    dropout = model.config.dropout > 0
    lm_weight = self.config.reward.lm_weight

    def loss_fn(params, batch, rng, frozen=None):
      del frozen
      chosen, rejected, nll, cols = answer_scores(model, params, batch, rng, dropout,
                                                  lm=lm_weight > 0)
      return pair_loss(pair_sums(chosen, rejected, batch['valid'], nll, lm_weight), cols,
                       batch['valid'])
    return loss_fn

  def eval_fn(self, model):
    lm_weight = self.config.reward.lm_weight

    def eval_fn(params, frozen, batch):
      del frozen
      chosen, rejected, nll, _ = answer_scores(model, params, batch, lm=lm_weight > 0)
      return dict(pair_sums(chosen, rejected, batch['valid'], nll, lm_weight),
                  weight=jnp.sum(batch['valid']))
    return eval_fn

  def summarize(self, sums: dict, data) -> dict:
    n = sums['weight']
    return {f'val_{k}': v / n for k, v in sums.items() if k != 'weight'} | {'val_pairs': int(n)}
