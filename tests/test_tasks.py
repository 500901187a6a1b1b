"""experiments.tasks: a labelled dataset as a padded sequence of class-group tasks."""

import jax
import numpy as np

from experiments import tasks


def dataset(n=60, classes=6, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n).astype(np.int32)
  images = (np.arange(n)[:, None, None, None] * np.ones((1, 2, 2, 1))).astype(np.uint8)
  return images, labels  # image i is filled with i: the rows say which examples were kept


def test_split_by_classes_keeps_dataset_order_and_relabels_inside_a_group():
  images, labels = dataset()
  data = tasks.split_by_classes(images, labels, ((4, 1), (0, 5)), relabel=True)
  for t, group in enumerate(((4, 1), (0, 5))):
    idx = np.flatnonzero(np.isin(labels, group))
    n = int(data.counts[t])
    assert n == len(idx)
    np.testing.assert_array_equal(data.inputs[t, :n, 0, 0, 0], idx)  # dataset order
    want = np.array([group.index(v) for v in labels[idx]])  # the group's order, unsorted too
    np.testing.assert_array_equal(data.labels[t, :n], want)
    assert not data.inputs[t, n:].any()  # padding


def test_split_by_classes_class_incremental_and_max_examples():
  images, labels = dataset()
  data = tasks.split_by_classes(images, labels, ((0, 1), (2, 3), (4, 5)), relabel=False,
                                max_examples=4)
  np.testing.assert_array_equal(data.counts, [4, 4, 4])
  for t in range(3):
    idx = np.flatnonzero(np.isin(labels, (2 * t, 2 * t + 1)))[:4]
    np.testing.assert_array_equal(data.labels[t, :4], labels[idx])  # global labels
    np.testing.assert_array_equal(data.inputs[t, :4, 0, 0, 0], idx)


def test_to_device_keeps_every_field():
  images, labels = dataset()
  data = tasks.split_by_classes(images, labels, ((0, 1),))
  on = tasks.to_device(data)
  assert all(isinstance(a, jax.Array) for a in on if a is not None)
  for a, b in zip(on, data):
    if b is not None:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
