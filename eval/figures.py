"""Figures written to files, never shown: matplotlib without a display, and one way to finish a
figure (lay it out, write it, free it). Every plot of eval/ and experiments/ goes through here."""

from __future__ import annotations

import matplotlib

matplotlib.use('Agg')  # files only; before pyplot is imported, so no display is ever needed
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ['plt', 'save']


def save(fig, path: str, dpi: int = 120) -> None:
  """Lays `fig` out, writes it to `path` and closes it (pyplot keeps every open figure alive)."""
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
