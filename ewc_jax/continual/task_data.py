"""Task sequences as padded arrays (:class:`TaskData`): every task's examples in one
``[T, N_max, ...]`` array with per-task counts, so one compiled program serves every task.

    >>> import numpy as np
    >>> from ewc_jax.continual import task_data
    >>> data = task_data.pad_tasks([np.ones((3, 2)), np.ones((1, 2))], [np.zeros(3), np.ones(1)])
    >>> data.inputs.shape, data.counts.tolist()
    ((2, 3, 2), [3, 1])
    >>> task_data.cumulative(data).counts.tolist()   # joint training: tasks 1..t in set t
    [3, 4]
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import numpy as np


class TaskData(NamedTuple):
  """Every task's examples padded to one shape.

  Attributes:
    inputs: ``[T, N_max, ...]`` (any dtype; ``preprocess`` turns a batch into model inputs).
    labels: ``[T, N_max]`` int32 labels (within the task, or global for class-incremental).
    counts: ``[T]`` int32 number of valid rows of each task (the first ``counts[t]`` rows).
    task_ids: optional ``[T, N_max]`` int32 task of each example, when a training set mixes
      tasks (joint training); ``None`` means every example of set t belongs to task t.
  """
  inputs: jax.Array
  labels: jax.Array
  counts: jax.Array
  task_ids: jax.Array | None = None


def pad_tasks(task_inputs: Sequence[np.ndarray], task_labels: Sequence[np.ndarray]) -> TaskData:
  """Stacks tasks of different sizes into ``[T, N_max, ...]`` arrays with per-task counts."""
  counts = np.array([len(x) for x in task_inputs], np.int32)
  n_max = int(counts.max())
  inputs = np.zeros((len(task_inputs), n_max) + task_inputs[0].shape[1:], task_inputs[0].dtype)
  labels = np.zeros((len(task_inputs), n_max), np.int32)
  for t, (x, y) in enumerate(zip(task_inputs, task_labels)):
    inputs[t, :len(x)] = x
    labels[t, :len(y)] = y
  return TaskData(inputs=inputs, labels=labels, counts=counts)


def cumulative(data: TaskData) -> TaskData:
  """Training sets for joint training: set t holds the examples of tasks 0..t (with task ids)."""
  inputs, labels, counts = (np.asarray(a) for a in data[:3])
  ids = (np.asarray(data.task_ids) if data.task_ids is not None else
         np.broadcast_to(np.arange(len(counts))[:, None], labels.shape))
  num_tasks, total = len(counts), int(counts.sum())
  out_x = np.zeros((num_tasks, total) + inputs.shape[2:], inputs.dtype)
  out_y = np.zeros((num_tasks, total), np.int32)
  out_t = np.zeros((num_tasks, total), np.int32)
  out_n = np.zeros(num_tasks, np.int32)
  for t in range(num_tasks):
    rows = [(inputs[k, :counts[k]], labels[k, :counts[k]], ids[k, :counts[k]])
            for k in range(t + 1)]
    n = sum(len(r[1]) for r in rows)
    out_x[t, :n] = np.concatenate([r[0] for r in rows])
    out_y[t, :n] = np.concatenate([r[1] for r in rows])
    out_t[t, :n] = np.concatenate([r[2] for r in rows])
    out_n[t] = n
  return TaskData(*(jax.device_put(a) for a in (out_x, out_y, out_n, out_t)))



__all__ = ["cumulative", "pad_tasks"]
