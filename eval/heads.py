"""Attention-head probes (Elhage et al. 2021; Olsson et al. 2022): pure functions any run can use.

    python -m eval.heads --workdir=DIR [--step=N] [--period=P] [--num_sequences=N]
        [--config.x.y=...]   (--config is the run's own config, DIR/config.json)

prints, for a trained run, every attention head's induction and previous-token scores, the loss
on the first and on the second copy of repeated random sequences, and the in-context learning
score on its validation text (written to DIR/heads.json too).

On a sequence of P random tokens followed by the same P tokens again (positions 0..2P-1):
  induction score       mean attention from each query i of the second copy (P <= i < 2P) to
                        i - P + 1, the token after the query token's earlier occurrence: what an
                        induction head attends to, to copy it
  previous-token score  mean attention from each query i >= 1 to i - 1
  copy losses           mean next-token loss on the targets of the first copy (positions 1..P-1,
                        unpredictable but for unigram statistics) and of the second (P+1..2P-1,
                        predictable by copying); its first token is in neither
On held-out text:
  ICL score             loss at a late position minus loss at an early one, averaged over the
                        contexts: Olsson et al.'s 500th minus 50th token of 512, at the same
                        fractions of our context (`icl_positions`); negative when later tokens
                        are predicted better because of what came before
Losses are indexed by the number of tokens seen: losses_BxT[:, t] is the loss of predicting token
t + 1 from tokens 0..t, so Olsson's "50th token" is index 49.
"""

from __future__ import annotations

import json
import os

import numpy as np

# JAX is imported in the functions that use it: `python -m eval.heads --help` does not wait for
# it (seconds of CPU).

# Olsson et al. 2022: the ICL score is the loss of the 500th token minus that of the 50th, in
# contexts of 512 tokens.
OLSSON_EARLY, OLSSON_LATE, OLSSON_CONTEXT = 50, 500, 512


def repeated_sequences(seed: int, batch: int, period: int, token_ids) -> np.ndarray:
  """(batch, 2 * period) int32: `period` tokens drawn uniformly from `token_ids`, then the same
  tokens again."""
  ids = np.asarray(token_ids)
  half = np.random.default_rng(seed).choice(ids, size=(batch, period))
  return np.concatenate([half, half], axis=1).astype(np.int32)


def induction_scores(probs_BxHxLxL, period: int):
  """(H,) mean attention of second-copy queries i to key i - period + 1."""
  import jax.numpy as jnp
  L = probs_BxHxLxL.shape[-1]
  queries = jnp.arange(period, min(2 * period, L))
  return jnp.mean(probs_BxHxLxL[:, :, queries, queries - period + 1], axis=(0, 2))


def previous_token_scores(probs_BxHxLxL):
  """(H,) mean attention of queries i >= 1 to key i - 1."""
  import jax.numpy as jnp
  queries = jnp.arange(1, probs_BxHxLxL.shape[-1])
  return jnp.mean(probs_BxHxLxL[:, :, queries, queries - 1], axis=(0, 2))


def next_token_losses(logits_BxLxV, tokens_BxL):
  """(B, L - 1): the loss of predicting tokens[:, t + 1] from the logits at t, in float32."""
  from train import step as step_lib
  return step_lib.token_losses(logits_BxLxV[:, :-1], tokens_BxL[:, 1:])


def copy_losses(losses_BxT, period: int):
  """(first copy loss, second copy loss): mean losses of the targets 1..P-1 and P+1..2P-1."""
  import jax.numpy as jnp
  return (jnp.mean(losses_BxT[:, :period - 1]),
          jnp.mean(losses_BxT[:, period:2 * period - 1]))


def icl_positions(context: int) -> tuple[int, int]:
  """(early, late) indices into per-position losses of contexts of `context` tokens: Olsson et
  al.'s 50th and 500th of 512, scaled (`context` 512 gives (49, 499); 128 gives (11, 124))."""
  early = max(1, round(context * OLSSON_EARLY / OLSSON_CONTEXT)) - 1
  late = min(context, round(context * OLSSON_LATE / OLSSON_CONTEXT)) - 1
  if late <= early:
    raise ValueError(f'a context of {context} tokens is too short for an ICL score')
  return early, late


def icl_score(losses_BxT, early: int, late: int):
  """Mean loss at position `late` minus mean loss at `early` over the contexts (rows)."""
  import jax.numpy as jnp
  return jnp.mean(losses_BxT[:, late]) - jnp.mean(losses_BxT[:, early])


def head_scores(model, params, tokens_BxL, period: int) -> dict:
  """The probes of one model on repeated sequences `tokens_BxL` (`repeated_sequences`):
  {'induction': (layers, H), 'previous_token': (layers, H), 'first_copy_loss',
  'second_copy_loss'}, with NaN rows for layers that are not attention. Jit-compatible."""
  import jax.numpy as jnp
  from model.capture import logits_and_attention
  logits_BxLxV, weights = logits_and_attention(model, params, tokens_BxL)
  first, second = copy_losses(next_token_losses(logits_BxLxV, tokens_BxL), period)
  H = model.config.num_heads
  nan = jnp.full((H,), jnp.nan)
  layers = range(model.config.num_layers)
  return {'induction': jnp.stack([induction_scores(weights[i], period) if i in weights else nan
                                  for i in layers]),
          'previous_token': jnp.stack([previous_token_scores(weights[i]) if i in weights else nan
                                       for i in layers]),
          'first_copy_loss': first, 'second_copy_loss': second}


def context_losses(model, params, inputs_BxL, targets_BxL):
  """(B, L) per-position losses of held-out contexts (the ICL score's input)."""
  from train import step as step_lib
  return step_lib.token_losses(model.apply({'params': params}, inputs_BxL), targets_BxL)


def spaced_windows(tokens: np.ndarray, seq_len: int, count: int) -> np.ndarray:
  """(at most count, seq_len + 1): windows of a token stream (train.data.PackedSequences) at
  evenly spaced indices, so that every part of a split (every file of a corpus) is sampled."""
  from train import data as data_lib
  windows = data_lib.PackedSequences(tokens, seq_len)
  index = np.unique(np.linspace(0, len(windows) - 1, count).round().astype(int))
  return np.stack([windows[i] for i in index])


def strongest(scores_LxH) -> tuple[int, int] | None:
  """(layer, head) of the highest score, ignoring NaN (non-attention layers); None if none."""
  scores = np.asarray(scores_LxH, np.float64)
  if not np.isfinite(scores).any():
    return None
  layer, head = np.unravel_index(np.nanargmax(scores), scores.shape)
  return int(layer), int(head)


def flat_metrics(scores: dict, prefix: str = '') -> dict[str, float]:
  """Scalar metrics of `head_scores` for metrics.jsonl: 'induction/layer_1/head_2', ...,
  'max_induction_score', 'max_previous_token_score' (attention models), and the copy losses."""
  out = {f'{prefix}{k}': float(scores[k]) for k in ('first_copy_loss', 'second_copy_loss')}
  for name in ('induction', 'previous_token'):
    table = np.asarray(scores[name], np.float64)
    for (layer, head), value in np.ndenumerate(table):
      if np.isfinite(value):
        out[f'{prefix}{name}/layer_{layer}/head_{head}'] = float(value)
    if np.isfinite(table).any():
      out[f'{prefix}max_{name}_score'] = float(np.nanmax(table))
  return out


def table(scores: dict) -> str:
  """The head scores as text: one row per attention head."""
  lines = [f'{"layer":>5} {"head":>4} {"induction":>9} {"prev-token":>10}']
  for (layer, head), value in np.ndenumerate(np.asarray(scores['induction'])):
    if np.isfinite(value):
      lines.append(f'{layer:>5} {head:>4} {value:>9.3f} '
                   f'{float(scores["previous_token"][layer, head]):>10.3f}')
  return '\n'.join(lines)


def probe_tokens(tokenizer) -> np.ndarray:
  """Token ids repeated sequences draw from: the vocabulary without end-of-text."""
  ids = np.arange(tokenizer.vocab_size)
  return ids[ids != tokenizer.eos_id] if tokenizer.eos_id is not None else ids


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  from absl import flags

  from train.restore import load_run
  from model.config import ConfigError
  from train import workdir as workdir_lib
  f = flags.FLAGS
  run = load_run(f.workdir, f.step, f.config)
  context = run.config.data.seq_len
  period = f.period or context // 2
  if not 2 <= period <= context // 2:
    raise ConfigError(f'--period={period}: two copies must fit the run\'s context of {context} '
                      f'tokens; give 2 <= period <= {context // 2}')
  tokens = repeated_sequences(f.seed, f.num_sequences, period, probe_tokens(run.tokenizer))
  scores = jax.device_get(jax.jit(lambda p, t: head_scores(run.model, p, t, period))(
      run.params, tokens))
  result = {'step': run.step, 'period': period, **flat_metrics(scores)}
  prepared = workdir_lib.load_data(f.workdir)
  if prepared is not None:
    rows = spaced_windows(prepared[2].tokens, context, f.num_contexts)
    losses = jax.jit(lambda p, x, y: context_losses(run.model, p, x, y))(
        run.params, rows[:, :-1], rows[:, 1:])
    early, late = icl_positions(context)
    result.update(icl_score=float(icl_score(losses, early, late)), icl_contexts=len(rows),
                  loss_early=float(jnp.mean(losses[:, early])),
                  loss_late=float(jnp.mean(losses[:, late])))
  print(f'step {run.step}, {f.num_sequences} sequences of {period} random tokens repeated:')
  if np.isfinite(np.asarray(scores['induction'])).any():
    print(table(scores))
  print(f'loss on the first copy {result["first_copy_loss"]:.3f}, on the second '
        f'{result["second_copy_loss"]:.3f}')
  if 'icl_score' in result:
    print(f'ICL score (loss at token {late + 1} minus token {early + 1}, {len(rows)} validation '
          f'contexts): {result["icl_score"]:.3f}')
  with open(os.path.join(f.workdir, 'heads.json'), 'w') as out:
    json.dump(result, out, indent=1)


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_integer('period', 0, 'Length of the random sequence that is repeated; 0: half '
                       'the run\'s context.')
  flags.DEFINE_integer('num_sequences', 64, 'Repeated sequences to score the heads on.')
  flags.DEFINE_integer('num_contexts', 256, 'Validation contexts for the ICL score.')
  flags.DEFINE_integer('seed', 0, 'Seed of the random sequences.')


if __name__ == '__main__':
  from train import cli
  define_flags()
  cli.command(main, 'Work directory of a training run.', config=cli.RUN_CONFIG)
