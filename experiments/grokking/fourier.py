"""Nanda et al. 2023's progress measure: the Fourier spectrum of the token embedding.

A transformer that groks modular addition embeds each residue x as cos(w_k x) and sin(w_k x) for a
few key frequencies w_k = 2 pi k / p and computes a + b through trigonometric identities. Its
embedding's energy, projected on the Fourier basis of Z_p, concentrates on those few k once it
generalises; while it only memorises, the energy is spread over all of them. The Gini coefficient
of the per-frequency norms measures that concentration during training (0: uniform, towards 1: a
few frequencies), and rises before validation accuracy does.

Works on numpy or jax arrays (jax inside the compiled training call).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def basis(p: int) -> np.ndarray:
  """The real orthonormal Fourier basis of functions on Z_p (p odd), rows:
  constant, then cos(2 pi k x / p) and sin(2 pi k x / p) for k = 1 .. (p - 1) / 2. (p, p)."""
  x = np.arange(p)
  rows = [np.full(p, 1.0 / np.sqrt(p))]
  for k in range(1, (p - 1) // 2 + 1):
    rows += [np.sqrt(2.0 / p) * np.cos(2 * np.pi * k * x / p),
             np.sqrt(2.0 / p) * np.sin(2 * np.pi * k * x / p)]
  return np.stack(rows).astype(np.float32)


def spectrum(embedding_PxD, basis_PxP):
  """Share of the embedding's non-constant energy at each frequency k = 1 .. (p - 1) / 2:
  (||cos_k . E||^2 + ||sin_k . E||^2) / sum over k. ((p - 1) / 2,), sums to 1."""
  energy_P = ((basis_PxP @ embedding_PxD) ** 2).sum(axis=-1)  # operators: numpy stays numpy
  energy_K = energy_P[1::2] + energy_P[2::2]                  # cos and sin of each frequency
  return energy_K / energy_K.sum()


def gini(values) -> jnp.ndarray:
  """Gini coefficient of non-negative values: 0 when all are equal, (n - 1) / n when one holds
  everything."""
  x = jnp.sort(values)
  n = x.shape[0]
  ranks = jnp.arange(1, n + 1, dtype=x.dtype)
  return 2.0 * jnp.sum(ranks * x) / (n * jnp.sum(x)) - (n + 1.0) / n


def sparsity(embedding_PxD, basis_PxP) -> jnp.ndarray:
  """Gini coefficient of the norms of the embedding's frequency components (Nanda et al.)."""
  return gini(jnp.sqrt(spectrum(embedding_PxD, basis_PxP)))


def key_frequencies(spectrum_K, min_share: float = 0.05) -> list[int]:
  """Frequencies k holding at least `min_share` of the energy, the largest first. 5% is about
  three times the uniform share of p = 113's 56 frequencies, and well below the ~10-20% each of
  the handful a generalising model uses."""
  share = np.asarray(spectrum_K)
  order = np.argsort(-share)
  return [int(i) + 1 for i in order if share[i] >= min_share]
