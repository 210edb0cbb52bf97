"""The needle probe's heat map (accuracy by depth and length), drawn from needle.json."""

from __future__ import annotations

from eval.figures import plt, save
import numpy as np  # noqa: E402


def heat_map(result: dict, path: str) -> None:
  grid = np.asarray([[np.nan if v is None else v for v in row] for row in result['accuracy']])
  lengths, depths = result['lengths'], result['depths']
  fig, ax = plt.subplots(figsize=(1.3 * len(lengths) + 2.5, 0.6 * len(depths) + 1.8))
  image = ax.imshow(grid, cmap='RdYlGn', vmin=0.0, vmax=1.0, aspect='auto')
  for i in range(len(depths)):
    for j in range(len(lengths)):
      text = '-' if np.isnan(grid[i, j]) else f'{grid[i, j]:.2f}'
      ax.text(j, i, text, ha='center', va='center', fontsize=8)
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_yticks(range(len(depths)), [f'{d:.0%}' for d in depths])
  ax.set_xlabel(f'probe length (characters; trained at {result["trained_len"]})')
  ax.set_ylabel('needle depth')
  ax.set_title(f'pass-key retrieval accuracy, {result["position"]}, {result["num"]} probes per '
               f'cell', fontsize=9)
  fig.colorbar(image, ax=ax, fraction=0.04)
  save(fig, path, dpi=120)
