"""The per-task progress bar (tqdm, on stderr)."""

from __future__ import annotations

import sys
from typing import Callable

from tqdm.auto import tqdm


def make(enabled: bool, prefix: str = "") -> Callable | None:
  """``progress(task_index, total, done=0)`` -> a tqdm bar for ``ewc_jax.continual.run``
  (None when disabled)."""
  if not enabled:
    return None

  def progress(task_index: int, total: int, done: int = 0):
    return tqdm(total=total, initial=done, desc=f"{prefix}task {task_index + 1}", unit="step",
                leave=True, dynamic_ncols=True, file=sys.stderr)
  return progress
