"""Plots of a sweep (DIR/scaling.png) and of several sweeps side by side (compare.png).

A sweep's figure: loss against N (one line per budget D) and against D (one line per size), each
with the fitted L(N) or L(D) and the Chinchilla fit drawn over the points; loss against compute
with the envelope and the IsoFLOP minima; the IsoFLOP profiles; N_opt and D_opt against compute;
and the fitted constants. matplotlib's object API (no pyplot): nothing global, no display needed.
"""

from __future__ import annotations

import textwrap

import numpy as np
from matplotlib import cm
from matplotlib.figure import Figure

from experiments.scaling import fits


def _column(runs, key) -> np.ndarray:
  return np.array([r[key] for r in runs], float)


def _colors(n: int):
  return cm.viridis(np.linspace(0.0, 0.9, max(n, 1)))


def _span(values, points: int = 100) -> np.ndarray:
  return np.geomspace(min(values), max(values), points)


def _short(x: float) -> str:
  for scale, suffix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if x >= scale:
      return f'{x / scale:.3g}{suffix}'
  return f'{x:.3g}'


def _chinchilla(summary):
  ch = summary['chinchilla']
  if 'skipped' in ch:
    return None
  return fits.Law(ch['E'], (ch['A'], ch['B']), (ch['alpha'], ch['beta']))


def _one_term(fit, coef: str, exponent: str):
  if 'skipped' in fit:
    return None
  return fits.Law(fit['E'], (fit[coef],), (fit[exponent],))


def loss_against(ax, runs, summary, x: str, by: str) -> None:
  """Loss against N (x='N', one line per D) or D (x='D', one line per N): the points, the
  Chinchilla fit through them (dotted) and L(N) or L(D) on the runs it was fitted to (dashed)."""
  groups = sorted({r[by] for r in runs})
  law2 = _chinchilla(summary)
  xs = _span(_column(runs, x))
  for color, g in zip(_colors(len(groups)), groups):
    of_g = sorted((r for r in runs if r[by] == g), key=lambda r: r[x])
    ax.plot(_column(of_g, x), _column(of_g, 'loss'), 'o-', color=color, ms=4, lw=1,
            label=f'{by} = {_short(g)}')
    if law2 is not None:
      ax.plot(xs, law2(xs, g) if x == 'N' else law2(g, xs), ':', color=color, lw=1)
  fit = summary['loss_vs_N'] if x == 'N' else summary['loss_vs_D']
  law = _one_term(fit, *(('A', 'alpha') if x == 'N' else ('B', 'beta')))
  if law is not None:
    exponent = 'alpha' if x == 'N' else 'beta'
    ax.plot(xs, law(xs), 'k--', lw=1.2,
            label=f'{exponent} = {fit[exponent]:.2f} (R$^2$ {fit["r2"]:.3f})')
  if law2 is not None:
    ax.plot([], [], 'k:', lw=1, label='Chinchilla fit')
  ax.set(xscale='log', xlabel=f'{x} ({"non-embedding parameters" if x == "N" else "tokens"})',
         ylabel='validation loss', title=f'loss vs {x}')
  ax.legend(fontsize=7)


def loss_against_compute(ax, runs, summary, color=None, label=None) -> None:
  """Every run (lines join a size's budgets), the envelope, the law fitted on the envelope and
  the IsoFLOP minima."""
  sizes = sorted({r['N'] for r in runs})
  for c, n in zip(_colors(len(sizes)), sizes):
    of_n = sorted((r for r in runs if r['N'] == n), key=lambda r: r['C'])
    ax.plot(_column(of_n, 'C'), _column(of_n, 'loss'), 'o-', color=color if color is not None
            else c, alpha=0.35 if color is not None else 1.0, ms=3, lw=0.8,
            label=None if color is not None else f'N = {_short(n)}')
  env = fits.envelope(runs)
  ax.plot(_column(env, 'C'), _column(env, 'loss'), 's-', color=color or 'k', ms=4, lw=1.5,
          label=f'{label + ": " if label else ""}envelope')
  fr = summary['frontier']
  law = _one_term(fr['loss_vs_C'], 'A', 'gamma')
  if law is not None:
    cs = _span(_column(runs, 'C'))
    ax.plot(cs, law(cs), '--', color=color or 'k', lw=1,
            label=f'gamma = {fr["loss_vs_C"]["gamma"]:.3f}')
  minima = fr['isoflop_minima']
  if minima and color is None:
    ax.plot(_column(minima, 'C'), _column(minima, 'L_opt'), '*', color='tab:red', ms=9,
            label='IsoFLOP minima')
  ax.set(xscale='log', xlabel='C (training FLOPs)', ylabel='validation loss',
         title='loss vs compute')
  ax.legend(fontsize=7)


def isoflop(ax, runs) -> None:
  """The IsoFLOP profiles: loss against N at fixed compute, interpolated from the grid, with
  their parabolas and minima."""
  profiles = fits.isoflop_profiles(runs)
  for color, p in zip(_colors(len(profiles)), profiles):
    ns = _span(p['N'])
    ax.plot(p['N'], p['loss'], 'o', color=color, ms=3)
    ax.plot(ns, np.polyval(p['parabola'], np.log(ns)), '-', color=color, lw=1,
            label=f'C = {_short(p["C"])}')
    if p['N_opt'] is not None:
      ax.plot(p['N_opt'], p['L_opt'], '*', color='tab:red', ms=9)
  ax.set(xscale='log', xlabel='N', ylabel='validation loss', title='IsoFLOP profiles')
  if profiles:
    ax.legend(fontsize=6, ncol=2)
  else:
    ax.text(0.5, 0.5, 'no compute level reaches 3 sizes', ha='center', transform=ax.transAxes)


def optimal_allocation(ax, summary, color=None, label=None) -> None:
  """N_opt and D_opt against compute, with the fitted power laws."""
  fr = summary['frontier']
  minima = fr['isoflop_minima']
  if not minima:
    ax.text(0.5, 0.5, 'no IsoFLOP minima', ha='center', transform=ax.transAxes)
    return
  c = _column(minima, 'C')
  cs = _span(c)
  for key, exp, marker, default in (('N_opt', 'a', 'o', 'tab:blue'),
                                    ('D_opt', 'b', 's', 'tab:orange')):
    col, prefix = color or default, f'{label}: ' if label else ''
    fitted = exp in fr  # a fit needs three minima
    ax.plot(c, _column(minima, key), marker, color=col, ms=4,
            label=None if fitted else f'{prefix}{key} (too few minima to fit)')
    if fitted:
      intercept = fr['log_N_opt_intercept' if key == 'N_opt' else 'log_D_opt_intercept']
      ax.plot(cs, np.exp(intercept) * cs ** fr[exp], '-' if key == 'N_opt' else '--', color=col,
              lw=1, label=f'{prefix}{key} ~ C^{fr[exp]:.2f}')
  ax.set(xscale='log', yscale='log', xlabel='C (training FLOPs)', ylabel='N_opt, D_opt',
         title='compute-optimal allocation')
  ax.legend(fontsize=7)


def constants(ax, summary) -> None:
  """The fitted constants with their 95% bootstrap intervals, as text."""
  ax.axis('off')
  lines = [textwrap.fill(line, 64, subsequent_indent='    ')
           for line in fits.describe(summary).splitlines()]
  ax.text(0.0, 1.0, '\n'.join(lines), va='top', ha='left', family='monospace', fontsize=7,
          transform=ax.transAxes)
  ax.set_title('fits, 95% bootstrap intervals')


def plot_sweep(runs, summary, path: str) -> None:
  fig = Figure(figsize=(15, 8.5), dpi=80, layout='constrained')
  axes = fig.subplots(2, 3).ravel()
  loss_against(axes[0], runs, summary, 'N', 'D')
  loss_against(axes[1], runs, summary, 'D', 'N')
  loss_against_compute(axes[2], runs, summary)
  isoflop(axes[3], runs)
  optimal_allocation(axes[4], summary)
  constants(axes[5], summary)
  fig.savefig(path)


def plot_compare(sweeps, path: str) -> None:
  """sweeps: (label, runs, summary) each. Loss against N with each sweep's L(N) fit, loss against
  compute with the envelopes, and the compute-optimal allocations."""
  fig = Figure(figsize=(15, 4.5), dpi=80, layout='constrained')
  ax_n, ax_c, ax_opt = fig.subplots(1, 3)
  for color, (label, runs, summary) in zip(cm.tab10.colors, sweeps):
    fit = summary['loss_vs_N']
    at_d = sorted((r for r in runs if r['D'] == fit['D']), key=lambda r: r['N'])
    ax_n.plot(_column(at_d, 'N'), _column(at_d, 'loss'), 'o', color=color, ms=4)
    law = _one_term(fit, 'A', 'alpha')
    if law is not None:
      ns = _span(_column(at_d, 'N'))
      ax_n.plot(ns, law(ns), '-', color=color, lw=1,
                label=f'{label}: alpha = {fit["alpha"]:.2f} (D = {_short(fit["D"])})')
    loss_against_compute(ax_c, runs, summary, color=color, label=label)
    optimal_allocation(ax_opt, summary, color=color, label=label)
  ax_n.set(xscale='log', xlabel='N (non-embedding parameters)',
           ylabel='validation loss', title='loss vs N at the budget of the L(N) fit')
  ax_n.legend(fontsize=7)
  fig.savefig(path)
