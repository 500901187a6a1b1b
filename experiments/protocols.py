"""The benchmarks' task sequences: Split and Permuted versions of a 28x28 10-class dataset.

Each builder returns a :class:`Tasks`: padded train/test :class:`ewc_jax.continual.task_data.TaskData` and the
class groups (what each task's classes are, for building the network of a scenario).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import numpy as np

from ewc_jax.continual.task_data import TaskData
from experiments import tasks as tasks_lib


class Tasks(NamedTuple):
  train: TaskData
  test: TaskData
  class_groups: tuple[tuple[int, ...], ...]
  info: dict


def split(ds, scenario: str, num_tasks: int, max_examples: int | None,
          class_groups: Sequence[Sequence[int]] = tasks_lib.SPLIT_MNIST_CLASSES) -> Tasks:
  """Split benchmark: task t holds the classes of group t (labels 0..k-1 inside a task, except
  class-incremental, where labels stay global)."""
  groups = tuple(tuple(g) for g in class_groups[:num_tasks])
  relabel = scenario != "class"
  train = tasks_lib.split_by_classes(ds.train_images, ds.train_labels, groups, relabel,
                                     max_examples)
  test = tasks_lib.split_by_classes(ds.test_images, ds.test_labels, groups, relabel, max_examples)
  return Tasks(train, test, groups, {"class_groups": [list(g) for g in groups]})


def permutations(key: jax.Array, num_tasks: int, num_pixels: int,
                 identity_first: bool = True) -> np.ndarray:
  """``[T, num_pixels]`` pixel permutations, one per task, from a PRNG key (task 1: identity)."""
  keys = jax.random.split(key, num_tasks)
  perms = np.stack([np.asarray(jax.random.permutation(k, num_pixels)) for k in keys])
  if identity_first:
    perms[0] = np.arange(num_pixels)
  return perms


def pad_images(images: np.ndarray, pad: int) -> np.ndarray:
  """``[N, H, W, C]`` images zero-padded by ``pad`` pixels on each side of H and W."""
  if pad == 0:
    return images
  if images.ndim != 4:
    raise ValueError(f"`pad`={pad} needs [N, H, W, C] images, got shape {images.shape}.")
  return np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def permuted(ds, scenario: str, num_tasks: int, max_examples: int | None,
             key: jax.Array, *, pad: int = 0, permute_first: bool = False) -> Tasks:
  """Permuted benchmark: every task has all 10 classes with its own fixed pixel permutation.

  Class-incremental labels are offset by 10·t (a 10·T-way head); otherwise labels are 0..9.
  ``pad``: each image is zero-padded by ``pad`` pixels on every side first, and the permutations
  act on the padded pixels (van de Ven & Tolias 2019: 28x28 -> 32x32, 1024 inputs).
  ``permute_first``: task 1 is permuted too (default: the identity).
  """
  num_classes = ds.num_classes
  shape = ds.train_images.shape[1:]
  if pad:
    shape = (shape[0] + 2 * pad, shape[1] + 2 * pad) + tuple(shape[2:])
  pixels = int(np.prod(shape))
  perms = permutations(key, num_tasks, pixels, identity_first=not permute_first)

  def build(images, labels):
    images = pad_images(images[:max_examples], pad).reshape(-1, pixels)
    labels = labels[:max_examples].astype(np.int32)
    xs = [images[:, perm] for perm in perms]
    ys = [labels + (num_classes * t if scenario == "class" else 0) for t in range(num_tasks)]
    return tasks_lib.pad_tasks(xs, ys)

  groups = tuple(tuple(range(num_classes * t, num_classes * (t + 1))) if scenario == "class"
                 else tuple(range(num_classes)) for t in range(num_tasks))
  return Tasks(build(ds.train_images, ds.train_labels), build(ds.test_images, ds.test_labels),
               groups, {"permutation_seed_derived": True, "identity_first": not permute_first,
                        "pad": pad, "num_inputs": pixels, "num_classes_per_task": num_classes})
