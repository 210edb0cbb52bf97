"""Scaling-law fits on a sweep's runs: L(N), L(D), the Chinchilla L(N, D), the loss envelope
against compute, IsoFLOP minima and the compute-optimal exponents, each with bootstrap intervals.

Every law here is a constant plus power-law terms, fitted in log space as Hoffmann et al. 2022
(App. D.2) fit theirs:

    log L = LSE(e, a_1 - alpha_1 log x_1, ..., a_K - alpha_K log x_K)
    i.e. L = E + A_1 x_1^-alpha_1 + ... + A_K x_K^-alpha_K,   E = exp(e), A_k = exp(a_k)

minimising a Huber loss (Chinchilla: delta 1e-3) or the squared error of the log-loss residuals
with L-BFGS from a grid of starts. K = 1 gives L(N) = E + A N^-alpha (and L(D), L(C)); K = 2 on
(N, D) gives Chinchilla's L(N, D) = E + A / N^alpha + B / D^beta.

A run is a dict with at least N (non-embedding parameters), D (tokens), C (training FLOPs),
flops_per_token (C / D) and loss (final validation loss); runs.jsonl rows have these keys.
Intervals are the 2.5th and 97.5th percentiles over refits on runs resampled with replacement.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import numpy as np
import threadpoolctl
from scipy import optimize

CHINCHILLA_HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid of starts: e, then (a_k, alpha_k) per term.
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_A = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
GRID_ALPHA = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_KEEP = 16        # L-BFGS runs from this many of the grid's best points
BOOTSTRAP_STARTS = 3  # a refit on resampled runs: the best few, and the full-data optimum


class NotEnoughData(ValueError):
  """Too few distinct runs for a fit; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class Law:
  """L = E + sum_k A_k x_k^-alpha_k."""
  E: float
  A: tuple[float, ...]
  alpha: tuple[float, ...]

  def __call__(self, *xs) -> np.ndarray:
    return self.E + sum(a * np.asarray(x, float) ** -al for a, x, al in zip(self.A, xs, self.alpha))

  @property
  def theta(self) -> np.ndarray:
    """(e, a_1, alpha_1, ..., a_K, alpha_K): the parameters L-BFGS moves."""
    pairs = [(np.log(a), al) for a, al in zip(self.A, self.alpha)]
    return np.array([np.log(self.E), *itertools.chain(*pairs)])

  @classmethod
  def from_theta(cls, theta) -> 'Law':
    theta = np.asarray(theta, float)
    return cls(float(np.exp(theta[0])), tuple(np.exp(theta[1::2]).tolist()),
               tuple(theta[2::2].tolist()))


def _residual_loss(r, delta):
  """Huber(r) with threshold delta, or r^2 / 2 when delta is None; and its derivative."""
  if delta is None:
    return 0.5 * r * r, r
  small = np.abs(r) <= delta
  return np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)), np.clip(r, -delta, delta)


def _objective(theta_SxT, logx_KxP, logl_P, delta):
  """The objective and its gradient at S parameter vectors (batched: it also scores the grid).

  log L = LSE over K + 1 terms: e, and a_k - alpha_k log x_k."""
  terms_SxJxP = np.empty((len(theta_SxT), len(logx_KxP) + 1, logx_KxP.shape[1]))
  terms_SxJxP[:, 0] = theta_SxT[:, :1]
  terms_SxJxP[:, 1:] = (theta_SxT[:, 1::2, None]
                        - theta_SxT[:, 2::2, None] * logx_KxP[None])
  top_SxP = terms_SxJxP.max(axis=1)
  weights_SxJxP = np.exp(terms_SxJxP - top_SxP[:, None])
  total_SxP = weights_SxJxP.sum(axis=1)
  loss_SxP, dloss_SxP = _residual_loss(top_SxP + np.log(total_SxP) - logl_P, delta)
  weights_SxJxP *= (dloss_SxP / total_SxP)[:, None]  # softmax (d LSE / d term) x d loss / d LSE
  grad_SxT = np.empty_like(theta_SxT)
  grad_SxT[:, 0] = weights_SxJxP[:, 0].sum(axis=1)
  grad_SxT[:, 1::2] = weights_SxJxP[:, 1:].sum(axis=2)
  grad_SxT[:, 2::2] = -(weights_SxJxP[:, 1:] * logx_KxP[None]).sum(axis=2)
  return loss_SxP.sum(axis=1), grad_SxT


def _objective_one(theta_T, logx_KxP, logl_P, delta):
  loss_S, grad_SxT = _objective(theta_T[None], logx_KxP, logl_P, delta)
  return loss_S[0], grad_SxT[0]


def grid_starts(num_terms: int) -> np.ndarray:
  """Hoffmann et al.'s grid: every combination of e, and (a, alpha) for each term."""
  axes = [GRID_E] + [GRID_A, GRID_ALPHA] * num_terms
  return np.array(list(itertools.product(*axes)))


def fit_law(xs: Sequence[np.ndarray], loss: np.ndarray, delta: float | None = None,
            near: Law | None = None) -> Law:
  """L = E + sum_k A_k x_k^-alpha_k through the points: L-BFGS from the GRID_KEEP points of the
  grid of starts with the lowest objective (the whole grid is scored at once); a refit `near` an
  earlier optimum (a bootstrap resample) starts from it and the BOOTSTRAP_STARTS best grid points.
  The best optimum wins. Exponents are kept >= 0 (a negative one is not a scaling law)."""
  logx_KxP = np.log(np.asarray(xs, float))
  logl_P = np.log(np.asarray(loss, float))
  starts = grid_starts(len(xs))
  keep = GRID_KEEP if near is None else BOOTSTRAP_STARTS
  starts = starts[np.argsort(_objective(starts, logx_KxP, logl_P, delta)[0])[:keep]]
  if near is not None:
    starts = np.vstack([starts, near.theta])
  # L-BFGS moves a_k - alpha_k * mean(log x_k) in place of a_k: the same law, but the two
  # parameters of a term no longer move together, which takes iterations from hundreds to tens.
  center_K = logx_KxP.mean(axis=1)
  starts[:, 1::2] -= starts[:, 2::2] * center_K
  bounds = [(None, None)] + [(None, None), (0.0, None)] * len(xs)
  best = None
  with threadpoolctl.threadpool_limits(1):  # BLAS threads only slow these tiny problems down
    for start in starts:
      result = optimize.minimize(_objective_one, start,
                                 args=(logx_KxP - center_K[:, None], logl_P, delta), jac=True,
                                 method='L-BFGS-B', bounds=bounds)
      if best is None or result.fun < best.fun:
        best = result
  theta = best.x.copy()
  theta[1::2] += theta[2::2] * center_K
  return Law.from_theta(theta)


def r_squared(loss, predicted) -> float:
  """Coefficient of determination of the fitted losses (in loss units, as plotted)."""
  loss, predicted = np.asarray(loss, float), np.asarray(predicted, float)
  return float(1.0 - np.sum((loss - predicted) ** 2) / np.sum((loss - loss.mean()) ** 2))


# ---------------------------------------------------------------------------------------------
# The fits of a sweep. Each takes runs and returns a dict of floats; `with_intervals` adds the
# bootstrap intervals.


def _column(runs, key) -> np.ndarray:
  return np.array([r[key] for r in runs], float)


def _need(count: int, parameters: int, what: str, refit: bool):
  """A fit needs one point more than it has parameters, so that R^2 says something; a bootstrap
  refit, which only needs the law determined, as many as it has parameters."""
  minimum = parameters + (not refit)
  if count < minimum:
    raise NotEnoughData(f'needs at least {minimum} {what}, got {count}')


def _one_term(x, loss, names: tuple[str, str], start=None) -> dict:
  """E + A x^-alpha through the points, its constants named (coefficient, exponent)."""
  _need(len(np.unique(x)), 3, 'distinct points for a 3-parameter law', start is not None)
  near = None if start is None else Law(start['E'], (start[names[0]],), (start[names[1]],))
  law = fit_law([x], loss, near=near)
  return {'E': law.E, names[0]: law.A[0], names[1]: law.alpha[0],
          'r2': r_squared(loss, law(x))}


def loss_vs_N(runs, start=None) -> dict:
  """L(N) = E + A N^-alpha (Kaplan et al.), fitted to runs of one token budget."""
  return _one_term(_column(runs, 'N'), _column(runs, 'loss'), ('A', 'alpha'), start)


def loss_vs_D(runs, start=None) -> dict:
  """L(D) = E + B D^-beta, fitted to runs of one model size."""
  return _one_term(_column(runs, 'D'), _column(runs, 'loss'), ('B', 'beta'), start)


def chinchilla(runs, start=None) -> dict:
  """Hoffmann et al.'s L(N, D) = E + A / N^alpha + B / D^beta (Huber on log-loss, delta 1e-3),
  and the compute-optimal exponents it implies: N_opt ~ C^a, D_opt ~ C^b with
  a = beta / (alpha + beta), b = alpha / (alpha + beta)."""
  n, d, loss = _column(runs, 'N'), _column(runs, 'D'), _column(runs, 'loss')
  _need(len({(r['N'], r['D']) for r in runs}), 5, 'distinct (N, D) points for the 5-parameter '
        'fit', start is not None)
  near = None
  if start is not None:
    near = Law(start['E'], (start['A'], start['B']), (start['alpha'], start['beta']))
  law = fit_law([n, d], loss, CHINCHILLA_HUBER_DELTA, near=near)
  alpha, beta = law.alpha
  total = alpha + beta
  return {'E': law.E, 'A': law.A[0], 'B': law.A[1], 'alpha': alpha, 'beta': beta,
          'a': beta / total if total else float('nan'),
          'b': alpha / total if total else float('nan'),
          'r2': r_squared(loss, law(n, d))}


def envelope(runs) -> list[dict]:
  """The runs on the loss-compute frontier: each has a lower loss than every cheaper run."""
  out = []
  for r in sorted(runs, key=lambda r: (r['C'], r['loss'])):
    if not out or r['loss'] < out[-1]['loss']:
      out.append(r)
  return out


def _sizes(runs) -> list[tuple[float, float, np.ndarray, np.ndarray]]:
  """(N, flops per token, log D, log loss) per model size, duplicates (resampling) averaged."""
  out = []
  for n in sorted({r['N'] for r in runs}):
    of_n = [r for r in runs if r['N'] == n]
    budgets = sorted({r['D'] for r in of_n})
    log_l = [np.mean([np.log(r['loss']) for r in of_n if r['D'] == d]) for d in budgets]
    out.append((n, of_n[0]['flops_per_token'], np.log(budgets), np.array(log_l)))
  return out


def isoflop_profiles(runs, levels_per_decade: int = 4) -> list[dict]:
  """Chinchilla's approach 2 on a grid of sizes x budgets: at each compute level C, the loss of
  every size whose budgets bracket D = C / (FLOPs per token), interpolated linearly in
  (log D, log L) between its runs; a parabola in log N through them; its vertex is N_opt(C)
  when it lies inside the sizes, and D_opt = C / (FLOPs per token at N_opt).

  Returns one dict per level with at least three sizes: C, N and loss of the points, the parabola
  (loss against log N, highest power first), and N_opt, D_opt, L_opt (None without a minimum)."""
  sizes = [s for s in _sizes(runs) if len(s[2]) >= 2]
  if not sizes:
    return []
  log_c_lo = min(np.log(f) + d[0] for _, f, d, _ in sizes)
  log_c_hi = max(np.log(f) + d[-1] for _, f, d, _ in sizes)
  step = np.log(10.0) / levels_per_decade
  log_n_all = np.log([n for n, *_ in sizes])
  log_f_all = np.log([f for _, f, *_ in sizes])
  profiles = []
  for log_c in np.arange(np.ceil(log_c_lo / step), np.floor(log_c_hi / step) + 1) * step:
    points = [(np.log(n), np.exp(np.interp(log_c - np.log(f), log_d, log_l)))
              for n, f, log_d, log_l in sizes if log_d[0] <= log_c - np.log(f) <= log_d[-1]]
    if len(points) < 3:
      continue
    log_n, loss = np.array(points).T
    parabola = np.polyfit(log_n, loss, 2)
    vertex = -parabola[1] / (2 * parabola[0]) if parabola[0] > 0 else np.inf
    minimum = dict(N_opt=None, D_opt=None, L_opt=None)
    if log_n.min() < vertex < log_n.max():
      log_f = np.interp(vertex, log_n_all, log_f_all)
      minimum = dict(N_opt=float(np.exp(vertex)), D_opt=float(np.exp(log_c - log_f)),
                     L_opt=float(np.polyval(parabola, vertex)))
    profiles.append(dict(C=float(np.exp(log_c)), N=np.exp(log_n).tolist(), loss=loss.tolist(),
                         parabola=parabola.tolist(), **minimum))
  return profiles


def _log_linear(x, y) -> tuple[float, float, float]:
  """(slope, intercept, R^2) of log y = slope * log x + intercept."""
  lx, ly = np.log(x), np.log(y)
  slope, intercept = np.polyfit(lx, ly, 1)
  return float(slope), float(intercept), r_squared(ly, slope * lx + intercept)


def frontier(runs, start=None) -> dict:
  """The compute-optimal allocation: N_opt ~ C^a and D_opt ~ C^b, fitted (least squares in
  log-log) through the IsoFLOP minima."""
  minima = [p for p in isoflop_profiles(runs) if p['N_opt'] is not None]
  _need(len(minima), 2, 'IsoFLOP profiles with a minimum inside the model sizes (add budgets '
        'that bracket the optimum: more tokens for the small models)', start is not None)
  c = _column(minima, 'C')
  a, a0, a_r2 = _log_linear(c, _column(minima, 'N_opt'))
  b, b0, b_r2 = _log_linear(c, _column(minima, 'D_opt'))
  return dict(a=a, b=b, a_r2=a_r2, b_r2=b_r2, log_N_opt_intercept=a0, log_D_opt_intercept=b0)


def loss_vs_C(runs, start=None) -> dict:
  """L = E + A C^-gamma, fitted to the loss envelope (the best loss reached at each compute)."""
  env = envelope(runs)
  return _one_term(_column(env, 'C'), _column(env, 'loss'), ('A', 'gamma'), start)


def with_intervals(fit: Callable[..., dict], runs: list[dict], num_samples: int,
                   rng: np.random.Generator) -> dict:
  """fit(runs), plus '<key>_ci': [2.5%, 97.5%] for every value it returns,
  from refits on `num_samples` resamples of the runs; 'bootstrap' counts the refits that had
  enough data. A fit without enough data returns {'skipped': reason}."""
  try:
    estimate = fit(runs)
  except NotEnoughData as e:
    return {'skipped': str(e)}
  samples = []
  for _ in range(num_samples):
    resampled = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
    try:
      samples.append(fit(resampled, start=estimate))
    except NotEnoughData:
      continue
  return dict(_add_intervals(estimate, samples), bootstrap=len(samples))


def _add_intervals(estimate: dict, samples: list[dict]) -> dict:
  out = {}
  for key, value in estimate.items():
    values = [s[key] for s in samples if np.isfinite(s[key])]
    out[key] = value
    out[f'{key}_ci'] = (np.percentile(values, [2.5, 97.5]).tolist() if values
                        else [float('nan')] * 2)
  return out


def _widest_slice(runs, key: str, across: str):
  """The value of `key` (a budget D, or a size N) whose runs cover the most values of `across`,
  the largest such: the largest D and N of a full grid; of a grid cut by sweep.max_flops, the
  budget every size ran, and the size that ran every budget."""
  return max({r[key] for r in runs},
             key=lambda v: (len({r[across] for r in runs if r[key] == v}), v))


def summarize(runs: list[dict], num_bootstrap: int = 100, seed: int = 0) -> dict:
  """Every fit of a sweep with its intervals: the content of summary.json. Each fit resamples
  the runs it is fitted to: L(N) those of one budget, L(D) those of one size (`_widest_slice`),
  the others all runs."""
  rng = np.random.default_rng(seed)
  d_n, n_d = _widest_slice(runs, 'D', 'N'), _widest_slice(runs, 'N', 'D')
  return {
      'num_runs': len(runs),
      'model_sizes': sorted({r['N'] for r in runs}),
      'token_budgets': sorted({r['D'] for r in runs}),
      'compute': 'C = training FLOPs per token (model.training_flops_per_token: 6 x (N + D x V) '
                 'plus attention) x D tokens',
      'loss_vs_N': dict(with_intervals(loss_vs_N, [r for r in runs if r['D'] == d_n],
                                       num_bootstrap, rng), D=d_n),
      'loss_vs_D': dict(with_intervals(loss_vs_D, [r for r in runs if r['N'] == n_d],
                                       num_bootstrap, rng), N=n_d),
      'chinchilla': with_intervals(chinchilla, runs, num_bootstrap, rng),
      'frontier': dict(with_intervals(frontier, runs, num_bootstrap, rng),
                       loss_vs_C=with_intervals(loss_vs_C, runs, num_bootstrap, rng),
                       envelope=[{k: r[k] for k in ('N', 'D', 'C', 'loss')}
                                 for r in envelope(runs)],
                       isoflop_minima=[{k: p[k] for k in ('C', 'N_opt', 'D_opt', 'L_opt')}
                                       for p in isoflop_profiles(runs) if p['N_opt']]),
  }


def _describe_fit(title: str, fit: dict, keys: tuple[str, ...], r2: str = 'r2') -> list[str]:
  if 'skipped' in fit:
    return [f'{title}: skipped, {fit["skipped"]}']
  values = '  '.join(f'{k} {fit[k]:.3g} [{fit[k + "_ci"][0]:.3g}, {fit[k + "_ci"][1]:.3g}]'
                     for k in keys)
  return [f'{title}: R2 {fit[r2]:.3f}', f'  {values}']


def describe(summary: dict) -> str:
  """The fitted constants with their 95% bootstrap intervals, as lines of text."""
  sizes, budgets = summary['model_sizes'], summary['token_budgets']
  return '\n'.join([
      f'{summary["num_runs"]} runs, {len(sizes)} sizes x {len(budgets)} budgets',
      f'N {min(sizes):.3g} to {max(sizes):.3g}, D {min(budgets):.3g} to {max(budgets):.3g}',
      *_describe_fit('L(N) = E + A N^-alpha', summary['loss_vs_N'], ('E', 'alpha')),
      *_describe_fit('L(D) = E + B D^-beta', summary['loss_vs_D'], ('E', 'beta')),
      *_describe_fit('L(N, D) = E + A/N^alpha + B/D^beta', summary['chinchilla'],
                     ('E', 'alpha', 'beta')),
      *_describe_fit('Envelope L(C) = E + A C^-gamma', summary['frontier']['loss_vs_C'],
                     ('E', 'gamma')),
      *_describe_fit('IsoFLOP minima: N_opt ~ C^a', summary['frontier'], ('a',), 'a_r2'),
      *_describe_fit('IsoFLOP minima: D_opt ~ C^b', summary['frontier'], ('b',), 'b_r2'),
  ])
