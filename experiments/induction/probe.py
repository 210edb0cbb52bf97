"""The periodic evaluation of the induction experiment: eval/heads.py's probes as an evaluator of
the training loop (`train.loop.train_and_evaluate(..., evaluators=[HeadProbe(...)])`).

At every evaluation it scores the model's heads on fixed repeated random sequences (induction and
previous-token scores, losses on the two copies; non-attention models get the losses only) and
measures the ICL score on fixed held-out contexts of the run's validation split (evenly spaced
windows, so both held-out text and held-out repeated segments) and of the held-out text alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eval import heads
from model import LM
from train import tokenizers
from train import workdir as workdir_lib


class HeadProbe:
  """evaluator(params, step) -> metrics; built lazily at its first call, when the run has written
  its tokenizer and tokenized splits into the work directory."""

  def __init__(self, run_config, probe_cfg, workdir: str, text_path: str):
    """`run_config`: the run's (its model and data sections); `probe_cfg`: config.probe."""
    self.config, self.probe = run_config, probe_cfg
    self.workdir, self.text_path = workdir, text_path
    self._fn = None

  def _build(self):
    c, probe = self.config, self.probe
    tokenizer = tokenizers.load(f'{self.workdir}/tokenizer')
    model = LM(workdir_lib.resolve_model_config(c.model, tokenizer.vocab_size))
    seq_len = c.data.seq_len
    period = probe.period or seq_len // 2
    self.period = period
    self.repeated = jnp.asarray(heads.repeated_sequences(
        probe.seed, probe.num_sequences, period, heads.probe_tokens(tokenizer)))
    _, _, validation = workdir_lib.load_data(self.workdir)
    contexts = {'': heads.spaced_windows(validation.tokens, seq_len, probe.num_contexts)}
    with open(self.text_path, encoding='utf-8') as f:
      text = f.read()
    held_out_text = tokenizer.encode(text[int(len(text) * (1 - c.data.val_fraction)):])
    contexts['_text'] = heads.spaced_windows(held_out_text, seq_len, probe.num_contexts)
    self.contexts = {k: jnp.asarray(v) for k, v in contexts.items()}
    self.early, self.late = heads.icl_positions(seq_len)

    def fn(params, repeated, contexts):
      out = {'scores': heads.head_scores(model, params, repeated, period)}
      for suffix, rows in contexts.items():
        losses = heads.context_losses(model, params, rows[:, :-1], rows[:, 1:])
        out[f'icl_score{suffix}'] = heads.icl_score(losses, self.early, self.late)
        out[f'loss_early{suffix}'] = jnp.mean(losses[:, self.early])
        out[f'loss_late{suffix}'] = jnp.mean(losses[:, self.late])
      return out

    self._fn = jax.jit(fn)

  def __call__(self, params, step: int) -> dict:
    del step
    if self._fn is None:
      self._build()
    out = jax.device_get(self._fn(params, self.repeated, self.contexts))
    metrics = heads.flat_metrics(out.pop('scores'))
    metrics.update({k: float(v) for k, v in out.items()})
    return metrics
