"""Turning a labelled image dataset into a padded sequence of tasks (``ewc_jax.continual.task_data.TaskData``)."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from ewc_jax.continual.task_data import pad_tasks
from ewc_jax.continual.task_data import TaskData

SPLIT_MNIST_CLASSES = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


def split_by_classes(images: np.ndarray, labels: np.ndarray,
                     class_groups: Sequence[Sequence[int]] = SPLIT_MNIST_CLASSES,
                     relabel: bool = True, max_examples: int | None = None) -> TaskData:
  """One task per class group, examples in dataset order.

  ``relabel=True`` maps a group's classes to 0..len(group)-1 (task/domain-incremental);
  ``False`` keeps the global labels (class-incremental). ``max_examples`` keeps the first N
  examples of each task.
  """
  xs, ys = [], []
  for group in class_groups:
    group = np.asarray(group)
    keep = np.isin(labels, group)
    y = labels[keep]
    if relabel:
      y = np.searchsorted(group, y) if np.all(np.diff(group) > 0) else np.array(
          [int(np.where(group == v)[0][0]) for v in y])
    xs.append(images[keep][:max_examples])
    ys.append(y.astype(np.int32)[:max_examples])
  return pad_tasks(xs, ys)


def to_device(data: TaskData) -> TaskData:
  """Puts a whole task sequence on the default device once."""
  return TaskData(*(None if a is None else jax.device_put(np.asarray(a)) for a in data))
