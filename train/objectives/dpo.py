"""Direct preference optimisation (Rafailov et al. 2023), sigmoid loss with optional label
smoothing (the "conservative DPO" of Mitchell 2023):

    h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))
    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

where log pi(y|x) sums the answer's token log-probabilities and `ref` is the frozen starting model
(train.init_from; with LoRA, the frozen base itself). `dpo.beta` and `dpo.label_smoothing` (eps).

`dpo.nll_weight` (lambda) adds the chosen answer's mean negative log-likelihood per token,
lambda * -log pi(y_c|x) / |y_c|, as RPO does (Pang et al. 2024, "Iterative Reasoning Preference
Optimization"): DPO alone can lower the chosen answer's likelihood as long as the rejected one
falls faster ("likelihood displacement"), which on a checkable task turns right greedy answers
wrong; the NLL term holds the chosen answers up. 0 is plain DPO.
Metrics, as the field reports them: the implicit rewards beta (log pi - log ref) of the chosen and
rejected answers, their margin and accuracy (chosen above rejected), and the mean log-ratio
log pi - log ref over both answers, a KL-like measure of the drift from the reference (0 at the
start, where the loss is log 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.blocks import AUX_LOSS, METRICS
from train import step as step_lib
from train.objectives.preferences import (PreferenceObjective, both_sides, chosen_mean_nll,
                                          halves, pair_loss)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float,
             label_smoothing: float = 0.0):
  """The loss per pair from the answers' summed log-probabilities."""
  h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
  return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
          - label_smoothing * jax.nn.log_sigmoid(-beta * h))


def answer_log_probs(model, params, rows, rng=None, dropout: bool = False):
  """(sum of log p over each row's answer tokens (2B,), the forward pass's collections)."""
  logits, cols = model.apply({'params': params}, rows['inputs'], deterministic=not dropout,
                             rngs={'dropout': rng} if dropout else {},
                             mutable=[AUX_LOSS, METRICS])
  log_probs = step_lib.token_log_probs(logits, rows['targets'])
  return jnp.sum(log_probs * rows['weights'], axis=-1), cols


class DPO(PreferenceObjective):
  name = 'dpo'
  reference = True

  def _sums(self, model, params, reference, batch, rng=None, dropout=False):
    rows = both_sides(batch)
    policy, cols = answer_log_probs(model, params, rows, rng, dropout)
    ref, _ = answer_log_probs(model, jax.lax.stop_gradient(reference), rows)
    ref = jax.lax.stop_gradient(ref)
    (pc, pr), (rc, rr) = halves(policy), halves(ref)
    dc = self.config.dpo
    beta, valid = dc.beta, batch['valid']
    reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
    chosen_nll = chosen_mean_nll(policy, rows)
    losses = dpo_loss(pc, pr, rc, rr, beta, dc.label_smoothing) + dc.nll_weight * chosen_nll
    sums = {'loss': jnp.sum(losses * valid),
            'chosen_nll': jnp.sum(chosen_nll * valid),
            'reward_chosen': jnp.sum(reward_c * valid),
            'reward_rejected': jnp.sum(reward_r * valid),
            'reward_margin': jnp.sum((reward_c - reward_r) * valid),
            'reward_accuracy': jnp.sum((reward_c > reward_r) * valid),
            'logratio': jnp.sum(0.5 * ((pc - rc) + (pr - rr)) * valid)}
    return sums, cols

  def loss_fn(self, model):
    dropout = model.config.dropout > 0

    def loss_fn(params, batch, rng, frozen):
      sums, cols = self._sums(model, params, frozen['start'], batch, rng, dropout)
      return pair_loss(sums, cols, batch['valid'])
    return loss_fn

  def eval_fn(self, model):
    def eval_fn(params, frozen, batch):
      sums, _ = self._sums(model, params, frozen['start'], batch)
      return dict(sums, weight=jnp.sum(batch['valid']))
    return eval_fn

  def summarize(self, sums: dict, data) -> dict:
    n = sums['weight']
    return {f'val_{k}': v / n for k, v in sums.items() if k != 'weight'} | {'val_pairs': int(n)}
