"""Zoology-style figures of a recall sweep (Arora et al. 2023, figure 2): accuracy against width,
one panel per difficulty, one line per pattern; and accuracy against recurrent state size."""

from __future__ import annotations

import os

import matplotlib.ticker

from eval.figures import plt, save


def _panels(runs: list[dict]) -> list[tuple[int, int]]:
  return sorted({(r['num_pairs'], r['seq_len']) for r in runs})


# Patterns that solve a task all sit at accuracy 1: each line gets its own marker size and dash so
# that the ones drawn first still show under the later ones.
STYLES = (dict(marker='o', ms=9, ls='-'), dict(marker='s', ms=6, ls='--'),
          dict(marker='^', ms=5, ls='-.'), dict(marker='D', ms=4, ls=':'))


def _lines(ax, runs: list[dict], x: str, target: float, chance: float | None) -> None:
  for i, pattern in enumerate(sorted({r['pattern'] for r in runs})):
    mine = sorted((r for r in runs if r['pattern'] == pattern), key=lambda r: r[x])
    ax.plot([r[x] for r in mine], [r['accuracy'] for r in mine], label=pattern,
            **STYLES[i % len(STYLES)])
  ax.axhline(target, color='grey', lw=0.8, ls=':')
  if chance is not None:
    ax.axhline(chance, color='black', lw=0.8, ls=(0, (1, 3)))
    ax.annotate('one of the row\'s values at random', (0.02, chance), xycoords=('axes fraction',
                'data'), xytext=(0, 2), textcoords='offset points', fontsize=7, va='bottom')
  ax.set_xscale('log', base=2)
  ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)


def _figure(runs: list[dict], x: str, xlabel: str, target: float, path: str) -> str:
  panels = _panels(runs)
  task = runs[0].get('task', 'mqar')
  items = 'pairs' if task == 'mqar' else 'tokens'
  fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False,
                           sharey=True)
  for ax, (pairs, seq_len) in zip(axes[0], panels):
    _lines(ax, [r for r in runs if (r['num_pairs'], r['seq_len']) == (pairs, seq_len)], x,
           target, 1 / pairs if task == 'mqar' else None)
    ax.set_title(f'{task}: {pairs} {items}, length {seq_len}')
    ax.set_xlabel(xlabel)
  axes[0][0].set_ylabel('accuracy on held-out answers')
  axes[0][-1].legend(fontsize=8)
  save(fig, path, dpi=110)
  return path


def plot_recall(runs: list[dict], target: float, workdir: str) -> list[str]:
  """recall.png (accuracy vs d_model), and state.png (accuracy vs state size) when some pattern
  has a recurrent mixer. Returns the paths written."""
  paths = [_figure(runs, 'd_model', 'model width (d_model)', target,
                   os.path.join(workdir, 'recall.png'))]
  recurrent = [r for r in runs if r['state_size'] > 0]
  if recurrent:
    paths.append(_figure(recurrent, 'state_size', 'recurrent state size (numbers)', target,
                         os.path.join(workdir, 'state.png')))
  return paths
