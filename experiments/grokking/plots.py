"""The grokking experiment's figures, drawn from its metrics and summaries (re-plottable from
metrics.jsonl and summary.json without training again)."""

from __future__ import annotations

from eval.figures import plt, save
import numpy as np  # noqa: E402


def _mark_steps(ax, summary: dict) -> None:
  if summary.get('memorize_step'):
    ax.axvline(summary['memorize_step'], color='tab:blue', ls=':', lw=1,
               label=f'memorised (train ≥ 99%): {summary["memorize_step"]}')
  if summary.get('grok_step'):
    ax.axvline(summary['grok_step'], color='tab:red', ls='--', lw=1,
               label=f'grokked (val ≥ 99%): {summary["grok_step"]}')


def plot_curves(rows: list[dict], summary: dict, path: str) -> None:
  """Train and validation accuracy and loss against step on a log axis."""
  steps = [r['step'] for r in rows]
  fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
  for split, color in (('train', 'tab:blue'), ('val', 'tab:red')):
    acc.plot(steps, [r[f'{split}_accuracy'] for r in rows], color=color, label=split)
    loss.plot(steps, [r[f'{split}_loss'] for r in rows], color=color, label=split)
  acc.set_ylabel('accuracy')
  acc.set_ylim(-0.02, 1.02)
  loss.set_ylabel('loss (nats)')
  loss.set_yscale('log')
  for ax in (acc, loss):
    _mark_steps(ax, summary)
    ax.set_xscale('log')
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  acc.legend(fontsize=8)
  title = f'{summary["operation"]}'
  if summary.get('prime'):
    title += f' mod {summary["prime"]}'
  fig.suptitle(f'{title}, {100 * summary["train_fraction"]:g}% of the table for training, '
               f'weight decay {summary["weight_decay"]:g}'
               + (', Grokfast' if summary.get('grokfast') else ''))
  save(fig, path, dpi=100)


def plot_fourier(spectrum: np.ndarray, keys: list[int], rows: list[dict], summary: dict,
                 path: str) -> None:
  """The final embedding's energy per frequency (key ones highlighted), and the Gini coefficient
  of its spectrum over training."""
  fig, (bars, gini) = plt.subplots(1, 2, figsize=(11, 4))
  k = np.arange(1, len(spectrum) + 1)
  colors = ['tab:red' if i in keys else 'tab:gray' for i in k]
  bars.bar(k, spectrum, color=colors)
  bars.set_xlabel('frequency k (cos and sin of 2πkx/p)')
  bars.set_ylabel('share of embedding energy')
  bars.set_title(f'final embedding: key frequencies {keys}', fontsize=10)
  gini.plot([r['step'] for r in rows], [r['embedding_fourier_gini'] for r in rows],
            color='tab:purple')
  _mark_steps(gini, summary)
  gini.set(xscale='log', xlabel='step', ylabel='Gini coefficient of frequency norms')
  gini.set_title('sparsity of the embedding in the Fourier basis', fontsize=10)
  gini.grid(alpha=0.3)
  gini.legend(fontsize=8)
  save(fig, path, dpi=100)


def plot_sweep(results: list[dict], num_steps: int, path: str) -> None:
  """Steps to generalise (and to memorise) against the training fraction, one line per weight
  decay; runs that never generalised are open markers at the step budget."""
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for i, wd in enumerate(sorted({r['weight_decay'] for r in results})):
    color = f'C{i}'
    runs = sorted((r for r in results if r['weight_decay'] == wd),
                  key=lambda r: r['train_fraction'])
    grokked = [r for r in runs if r['grok_step'] is not None]
    ax.plot([r['train_fraction'] for r in grokked], [r['grok_step'] for r in grokked], 'o-',
            color=color, label=f'generalised, weight decay {wd:g}')
    memorised = [r for r in runs if r['memorize_step'] is not None]
    ax.plot([r['train_fraction'] for r in memorised], [r['memorize_step'] for r in memorised],
            's:', color=color, alpha=0.6, label=f'memorised, weight decay {wd:g}')
    never = [r for r in runs if r['grok_step'] is None]
    if never:
      ax.plot([r['train_fraction'] for r in never], [num_steps] * len(never), 'o', color=color,
              mfc='none', label=f'not generalised in {num_steps} steps')
  ax.set(yscale='log', xlabel='training fraction of the table', ylabel='steps to 99% accuracy')
  ax.set_title('Generalisation comes sooner with more training data', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  save(fig, path, dpi=100)
