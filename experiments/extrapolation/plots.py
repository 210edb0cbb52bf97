"""The extrapolation experiment's figure, drawn from summary.json alone (re-plottable without
training again): Press et al. 2022's Figure 1 (loss against evaluation length, one line per
scheme) beside the loss by position at the longest length."""

from __future__ import annotations

from eval.figures import plt, save

COLORS = {'rope': 'tab:blue', 'alibi': 'tab:red', 'sinusoidal': 'tab:green',
          'learned': 'tab:purple', 'none': 'tab:gray', 'mamba': 'tab:orange'}
STYLES = {'linear': '--', 'ntk': '-.', 'yarn': ':'}


def plot(summary: dict, path: str) -> None:
  trained = summary['trained_len']
  fig, (by_length, by_position) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name, row in summary['schemes'].items():
    lengths = [int(n) for n, v in row['loss_by_length'].items() if v is not None]
    by_length.plot(lengths, [row['loss_by_length'][str(n)] for n in lengths], marker='o',
                   color=COLORS.get(name), label=name)
    curve = row.get('loss_by_position_buckets') or []
    by_position.plot([(b['start'] + b['end'] - 1) / 2 for b in curve],
                     [b['loss'] for b in curve], color=COLORS.get(name), label=name)
  for scaling, row in summary.get('rope_scaled', {}).items():
    lengths = [int(n) for n in row['loss_by_length']]
    by_length.plot(lengths, [row['loss_by_length'][str(n)] for n in lengths], marker='.',
                   ls=STYLES.get(scaling, '--'), color=COLORS['rope'],
                   label=f'rope + {scaling} (s = L / {trained})')
  for ax in (by_length, by_position):
    ax.axvline(trained, color='k', lw=0.8, ls=':')
    ax.set_xscale('log', base=2)
    ax.set_ylabel('validation loss (nats per character)')
    ax.grid(alpha=0.3)
  by_length.set_xlabel('evaluation length L (tokens per window)')
  by_length.set_title(f'loss over windows of L tokens (trained at {trained})')
  by_position.set_xlabel('position in the window')
  by_position.set_title(f'loss by position at L = {summary["max_len"]}')
  top = max(max(v for v in r['loss_by_length'].values() if v is not None)
            for r in summary['schemes'].values())
  lowest = min(min(v for v in r['loss_by_length'].values() if v is not None)
               for r in summary['schemes'].values())
  for ax in (by_length, by_position):
    ax.set_ylim(lowest - 0.1, min(top, lowest + 3.0) + 0.1)
  by_length.legend(fontsize=7, ncol=2)
  save(fig, path, dpi=120)
