"""Continual-learning metrics of an accuracy matrix.

``R[i, j]`` = test accuracy on task j after training task i (0-based here; tasks 1..T in docs/maths.md).

* average accuracy  AA  = mean_j R[T-1, j]
* backward transfer BWT = mean_{j<T-1} (R[T-1, j] - R[j, j])   (Lopez-Paz & Ranzato, 2017)
* forgetting_j          = max_{j<=i<T-1} R[i, j] - R[T-1, j]     for j < T-1 (Chaudhry et al., 2018)
"""

from __future__ import annotations

import numpy as np


def _matrix(acc_matrix) -> np.ndarray:
  r = np.asarray(acc_matrix, dtype=np.float64)
  if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
    raise ValueError(f"`acc_matrix` must be a non-empty square [T, T] matrix, got shape {r.shape}.")
  return r


def average_accuracy(acc_matrix) -> float:
  """Mean accuracy over all tasks after the last task."""
  return float(np.mean(_matrix(acc_matrix)[-1]))


def backward_transfer(acc_matrix) -> float:
  """Mean change of each earlier task's accuracy from just after it was learned to the end."""
  r = _matrix(acc_matrix)
  t = r.shape[0]
  if t == 1:
    return 0.0
  return float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))


def forgetting(acc_matrix) -> list[float]:
  """Per earlier task: best accuracy it ever had (before the last task) minus its final one."""
  r = _matrix(acc_matrix)
  t = r.shape[0]
  return [float(np.max(r[j:t - 1, j]) - r[-1, j]) for j in range(t - 1)]


def summarize(acc_matrix) -> dict:
  """``{"average_accuracy", "bwt", "forgetting", "mean_forgetting"}`` of one matrix."""
  f = forgetting(acc_matrix)
  return {
      "average_accuracy": average_accuracy(acc_matrix),
      "bwt": backward_transfer(acc_matrix),
      "forgetting": f,
      "mean_forgetting": float(np.mean(f)) if f else 0.0,
  }
