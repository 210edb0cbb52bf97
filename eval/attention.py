"""python -m eval.attention --workdir=DIR --text="..." [--step=N] [--out=PATH] [--config.x.y=...]

Draws every attention head of a trained run on a text, one panel per (layer, head) in a grid of
layers by heads: row i of a panel is where the query at token i attends (keys on the x axis).
Writes DIR/attention.png unless --out says otherwise. Attention is captured with
model/capture.py; layers that are not attention (Mamba, ...) have no row.
"""

from __future__ import annotations

import os

import numpy as np

MAX_LABELS = 48  # tokens labelled on a panel's axes; longer texts are drawn unlabelled


def token_labels(tokenizer, ids) -> list[str]:
  """What each token reads as, with whitespace made visible."""
  return [tokenizer.decode([int(i)]).replace('\n', '\\n').replace(' ', '␣') or '·' for i in ids]


def plot_heads(weights: dict, labels: list[str] | None, path: str, title: str = '',
               heads: list[tuple[int, int]] | None = None) -> str:
  """A grid of attention patterns: `weights` {layer: (H, L, L)} (one sequence), every head of
  every layer, or only the (layer, head) pairs of `heads` in one row. Returns `path`."""
  from eval.figures import plt, save
  panels = heads or [(layer, h) for layer in sorted(weights)
                     for h in range(np.asarray(weights[layer]).shape[0])]
  cols = len(panels) if heads else max(np.asarray(w).shape[0] for w in weights.values())
  rows = 1 if heads else len(weights)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows + 0.6), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  row_of = {layer: r for r, layer in enumerate(sorted(weights))}
  for n, (layer, h) in enumerate(panels):
    ax = axes[0, n] if heads else axes[row_of[layer], h]
    ax.axis('on')
    probs = np.asarray(weights[layer])[h]
    ax.imshow(probs, cmap='Blues', vmin=0.0, vmax=1.0, interpolation='nearest')
    ax.set_title(f'layer {layer}, head {h}', fontsize=9)
    ax.set_xlabel('key', fontsize=7)
    ax.set_ylabel('query', fontsize=7)
    if labels is not None and len(labels) <= MAX_LABELS:
      ticks = np.arange(len(labels))
      ax.set_xticks(ticks, labels, fontsize=5, rotation=90)
      ax.set_yticks(ticks, labels, fontsize=5)
    else:
      ax.set_xticks([])
      ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=10)
  save(fig, path, dpi=130)
  return path


def main(argv):
  del argv
  import jax
  from absl import flags

  from train.restore import load_run
  from model.capture import attention_weights
  from model.config import check_context
  from train.tokenizers import TokenizerError
  f = flags.FLAGS
  run = load_run(f.workdir, f.step, f.config)
  if not f.text:
    raise TokenizerError('--text is empty; give the text whose attention to draw')
  ids = run.tokenizer.encode(f.text)
  check_context(run.model_cfg, len(ids), 'the text')
  weights = jax.jit(lambda p, t: attention_weights(run.model, p, t))(run.params, ids[None])
  if not weights:
    raise TokenizerError(f'the run\'s pattern {run.model_cfg.pattern!r} has no attention layer '
                         f'to draw')
  path = f.out or os.path.join(f.workdir, 'attention.png')
  plot_heads({layer: np.asarray(w[0]) for layer, w in weights.items()},
             token_labels(run.tokenizer, ids), path,
             f'{f.workdir} at step {run.step}: {len(ids)} tokens')
  print(f'wrote {path}: {len(weights)} attention layers x {run.model_cfg.num_heads} heads on '
        f'{len(ids)} tokens')


if __name__ == '__main__':
  from absl import flags

  from train import cli
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_string('text', '', 'The text to draw the attention on.')
  flags.DEFINE_string('out', '', 'Where to write the PNG (default DIR/attention.png).')
  cli.command(main, 'Work directory of a training run.', config=cli.RUN_CONFIG)
