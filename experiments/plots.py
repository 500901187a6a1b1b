"""PNG plots of a run: the accuracy-matrix heatmap and per-task accuracy over training."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position


def accuracy_heatmap(acc: np.ndarray, path: Path, title: str) -> None:
  """R[i, j] (rows: after training task i; columns: tested on task j), in percent."""
  acc = 100 * np.asarray(acc)
  t = acc.shape[0]
  fig, ax = plt.subplots(figsize=(1.1 * t + 2.5, 0.9 * t + 1.8))
  im = ax.imshow(acc, vmin=0, vmax=100, cmap="viridis")
  for i in range(t):
    for j in range(t):
      ax.text(j, i, f"{acc[i, j]:.1f}", ha="center", va="center", fontsize=8,
              color="white" if acc[i, j] < 60 else "black")
  labels = [str(k + 1) for k in range(t)]
  ax.set_xticks(range(t), labels)
  ax.set_yticks(range(t), labels)
  ax.set_xlabel("tested on task j")
  ax.set_ylabel("after training task i")
  ax.set_title(title, fontsize=10)
  fig.colorbar(im, ax=ax, label="test accuracy (%)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def accuracy_over_training(acc: np.ndarray, std: np.ndarray | None, path: Path,
                           title: str) -> None:
  """One line per task j: its test accuracy after each training task i >= j (± std)."""
  acc = 100 * np.asarray(acc)
  t = acc.shape[0]
  fig, ax = plt.subplots(figsize=(7, 4.2))
  x = np.arange(1, t + 1)
  for j in range(t):
    line, = ax.plot(x[j:], acc[j:, j], marker="o", ms=3, label=f"task {j + 1}")
    if std is not None:
      s = 100 * np.asarray(std)[j:, j]
      ax.fill_between(x[j:], acc[j:, j] - s, acc[j:, j] + s, alpha=0.15, color=line.get_color())
  ax.plot(x, [acc[i, :i + 1].mean() for i in range(t)], "k--", lw=2, label="mean of seen tasks")
  ax.set_xlabel("after training task")
  ax.set_ylabel("test accuracy (%)")
  ax.set_xticks(x)
  ax.set_ylim(0, 101)
  ax.grid(alpha=0.3)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7, ncol=2 if t > 6 else 1, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
