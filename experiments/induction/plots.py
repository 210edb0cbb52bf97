"""The induction experiment's figures: the scores against steps, and the heads themselves."""

from __future__ import annotations

from eval.figures import plt, save


def plot_scores(models: dict[str, list[dict]], summaries: dict[str, dict], path: str) -> str:
  """Three panels against steps, one line per model: the strongest induction score (solid) and
  previous-token score (dotted), the ICL score, the loss on the second copy of repeated random
  sequences (and, dashed, on the first). Each model's phase change is a vertical line."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for i, (pattern, rows) in enumerate(models.items()):
    color = f'C{i}'
    steps = [r['step'] for r in rows]
    if 'max_induction_score' in rows[-1]:
      axes[0].plot(steps, [r['max_induction_score'] for r in rows], color=color,
                   label=f'{pattern}: induction')
      axes[0].plot(steps, [r['max_previous_token_score'] for r in rows], color=color, ls=':',
                   label=f'{pattern}: previous token')
    axes[1].plot(steps, [r['icl_score'] for r in rows], color=color, label=f'{pattern}')
    axes[2].plot(steps, [r['second_copy_loss'] for r in rows], color=color,
                 label=f'{pattern}: second copy')
    axes[2].plot(steps, [r['first_copy_loss'] for r in rows], color=color, ls='--', alpha=0.5,
                 label=f'{pattern}: first copy')
    change = summaries[pattern].get('phase_change_step')
    if change is not None:
      for ax in axes:
        ax.axvline(change, color=color, ls='--', lw=1, alpha=0.7)
      axes[0].annotate(f'phase change\nstep {change}', (change, 0.52), color=color, fontsize=8,
                       xytext=(4, 0), textcoords='offset points')
  axes[0].axhline(0.5, color='gray', lw=0.5)
  axes[0].set(ylabel='score (attention share)', title='strongest head on repeated random tokens',
              ylim=(0, 1.02))
  axes[1].axhline(0.0, color='gray', lw=0.5)
  axes[1].set(ylabel='loss late - loss early (nats)',
              title='in-context learning score (held-out contexts)')
  axes[2].set(ylabel='loss (nats/token)', title='loss on repeated random tokens')
  for ax in axes:
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  save(fig, path, dpi=120)
  return path
