r"""A validation split held out from each task's *training* data, for choosing hyperparameters.

Hyperparameters (λ, learning rate, ...) are chosen on data the model is not trained on and that
is not the test set (van de Ven & Tolias 2019; Hsu et al. 2018): :func:`split` moves a fixed
fraction of every task's training examples into a validation set. The rows are drawn with a
PRNG key made from ``seed`` alone (not the run's seed), so every run, every seed and every
config of a sweep holds out exactly the same examples, and the test set is never touched.

    >>> import numpy as np
    >>> from ewc_jax.continual import holdout, task_data
    >>> data = task_data.TaskData(np.arange(20).reshape(2, 10, 1), np.zeros((2, 10), np.int32),
    ...                       np.array([10, 8], np.int32))
    >>> fit, val = holdout.split(data, 0.25, seed=0)
    >>> fit.counts.tolist(), val.counts.tolist()
    ([8, 6], [2, 2])
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from ewc_jax import errors
from ewc_jax.continual.task_data import TaskData


def num_held_out(count: int, fraction: float) -> int:
  """``round(fraction · count)`` rows, at least 1 and at most ``count - 1`` (0 if fraction is 0)."""
  return 0 if fraction == 0 else min(max(int(round(fraction * count)), 1), count - 1)


def holdout_rows(count: int, fraction: float, key: jax.Array) -> np.ndarray:
  """Sorted indices (of ``range(count)``) of the :func:`num_held_out` held-out rows."""
  perm = np.asarray(jax.random.permutation(key, count))
  return np.sort(perm[:num_held_out(count, fraction)])


def split(data: TaskData, fraction: float,
          seed: int = 0) -> tuple[TaskData, TaskData]:
  """``(train, validation)``: ``fraction`` of each task's valid rows held out.

  Both keep the padded layout (``[T, N_max, ...]`` with per-task counts); rows keep their
  dataset order. Task t's rows come from ``jax.random.fold_in(jax.random.key(seed), t)``.
  """
  if not 0 < fraction < 1:
    raise ValueError(f"`validation_fraction` must be in (0, 1), but got {fraction!r}.")
  if data.task_ids is not None:
    raise ValueError("`data` must be per-task training sets (no `task_ids`): hold the "
                     "validation split out before building joint (cumulative) sets.")
  inputs, labels, counts = (np.asarray(a) for a in data[:3])
  if int(counts.min()) < 2:
    raise ValueError(f"every task needs at least 2 training examples to hold some out, but "
                     f"task {int(counts.argmin()) + 1} has {int(counts.min())}.")
  key = jax.random.key(seed)
  parts = []
  for t, count in enumerate(counts.tolist()):
    val_rows = holdout_rows(count, fraction, jax.random.fold_in(key, t))
    keep = np.ones(count, bool)
    keep[val_rows] = False
    parts.append((np.flatnonzero(keep), val_rows))

  def gather(which: int) -> TaskData:
    n = np.array([len(p[which]) for p in parts], np.int32)
    x = np.zeros((len(parts), int(n.max())) + inputs.shape[2:], inputs.dtype)
    y = np.zeros((len(parts), int(n.max())), labels.dtype)
    for t, p in enumerate(parts):
      x[t, :n[t]], y[t, :n[t]] = inputs[t, p[which]], labels[t, p[which]]
    return TaskData(*(jax.device_put(a) for a in (x, y, n)))
  return gather(0), gather(1)


def check_batch_size(batch_size: int, counts, validation_fraction: float = 0.0, *,
                     blame: Callable[..., errors.SettingError | None] | None = None) -> None:
  """Raises :class:`~ewc_jax.errors.SettingError` unless a batch fits in the smallest task's
  training set after the validation split is held out (``counts``: each task's examples before
  it). The message blames ``validation_fraction`` when the split took most of that task, else
  ``blame(task=, count=, kept=, held=)``'s error when it gives one (a caller's own setting that
  made the task small), else ``batch_size``."""
  counts = np.asarray(counts)
  trained = np.array([c - num_held_out(int(c), validation_fraction) for c in counts])
  smallest, task = int(trained.min()), int(trained.argmin()) + 1
  if batch_size <= smallest:
    return
  count = int(counts[task - 1])
  held = count - smallest
  if held and smallest <= count // 2:  # the split took most of the task
    raise errors.SettingError(lambda n: (
        f"{n('validation_fraction')}={validation_fraction!r} is invalid here: it holds out "
        f"{held} of task {task}'s {count} training examples, leaving {smallest}, fewer than "
        f"{n('batch_size')}={batch_size}; expected a smaller fraction (or a smaller batch)."))
  err = blame(task=task, count=count, kept=smallest, held=held) if blame is not None else None
  if err is not None:
    raise err
  raise errors.SettingError(lambda n: (
      f"{n('batch_size')}={batch_size} is invalid: expected at most {smallest}, the number of "
      f"training examples of the smallest task (task {task}"
      + (", after holding out the validation split" if held else "") + ")."))


__all__ = ["check_batch_size", "holdout_rows", "num_held_out", "split"]
