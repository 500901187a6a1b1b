"""experiments.protocols: the Split and Permuted task sequences of a 10-class dataset."""

import jax
import numpy as np

from experiments import data, protocols


def tiny(n=50, m=20, shape=(4, 4, 1), seed=0):
  rng = np.random.default_rng(seed)
  make = lambda k: (rng.integers(0, 256, (k,) + shape).astype(np.uint8),  # noqa: E731
                    np.arange(k, dtype=np.int32) % 10)
  (xi, yi), (xt, yt) = make(n), make(m)
  return data.Dataset(xi, yi, xt, yt, "tiny", "1.0.0", 0.0, False)


def test_split_groups_and_labels_per_scenario():
  ds = tiny()
  til = protocols.split(ds, "task", 3, None)
  cil = protocols.split(ds, "class", 3, None)
  assert til.class_groups == cil.class_groups == ((0, 1), (2, 3), (4, 5))
  assert set(np.unique(til.train.labels[2, :int(til.train.counts[2])])) == {0, 1}
  assert set(np.unique(cil.train.labels[2, :int(cil.train.counts[2])])) == {4, 5}
  assert til.info == {"class_groups": [[0, 1], [2, 3], [4, 5]]}


def test_permuted_tasks_are_fixed_permutations_of_the_same_examples():
  ds = tiny()
  key = jax.random.key(3)
  tasks = protocols.permuted(ds, "domain", 3, None, key)
  flat = ds.train_images.reshape(len(ds.train_images), -1)
  perms = protocols.permutations(key, 3, flat.shape[1])
  np.testing.assert_array_equal(perms[0], np.arange(flat.shape[1]))  # task 1: the dataset itself
  assert all(sorted(p) == list(range(flat.shape[1])) for p in perms)
  assert not np.array_equal(perms[1], perms[2])
  for t in range(3):
    np.testing.assert_array_equal(tasks.train.inputs[t, :50], flat[:, perms[t]])
    np.testing.assert_array_equal(tasks.train.labels[t, :50], ds.train_labels)
  assert tasks.class_groups == (tuple(range(10)),) * 3
  again = protocols.permuted(ds, "domain", 3, None, jax.random.key(3))
  np.testing.assert_array_equal(again.train.inputs, tasks.train.inputs)  # the key decides


def test_permuted_class_incremental_offsets_labels_and_max_examples_cuts():
  ds = tiny()
  tasks = protocols.permuted(ds, "class", 2, 7, jax.random.key(0))
  np.testing.assert_array_equal(tasks.train.counts, [7, 7])
  np.testing.assert_array_equal(tasks.train.labels[1, :7], ds.train_labels[:7] + 10)
  assert tasks.class_groups == (tuple(range(10)), tuple(range(10, 20)))
  assert tasks.info["num_classes_per_task"] == 10


def test_permuted_van_de_ven_inputs_pad_then_permute_every_task():
  """pad=2, permute_first: each 4x4 image is zero-padded to 8x8 (64 inputs) and every task,
  the first included, is a permutation of the 64 padded pixels (van de Ven & Tolias 2019)."""
  ds = tiny()
  key = jax.random.key(3)
  tasks = protocols.permuted(ds, "domain", 3, None, key, pad=2, permute_first=True)
  padded = np.zeros((50, 8, 8, 1), np.uint8)
  padded[:, 2:6, 2:6] = ds.train_images
  flat = padded.reshape(50, 64)
  perms = protocols.permutations(key, 3, 64, identity_first=False)
  assert tasks.train.inputs.shape == (3, 50, 64)
  assert not np.array_equal(perms[0], np.arange(64))  # task 1 permuted too
  for t in range(3):
    np.testing.assert_array_equal(tasks.train.inputs[t], flat[:, perms[t]])
    # the zeros of the padding are mixed in: 64 - 16 inputs are always 0, wherever they went
    assert int((tasks.train.inputs[t] == 0).all(axis=0).sum()) >= 48
  assert tasks.info["pad"] == 2 and tasks.info["num_inputs"] == 64
  assert tasks.info["identity_first"] is False
  test = tasks.test.inputs[1, :20]
  padded_test = np.pad(ds.test_images, ((0, 0), (2, 2), (2, 2), (0, 0))).reshape(20, 64)
  np.testing.assert_array_equal(test, padded_test[:, perms[1]])


def test_permuted_defaults_unchanged_by_the_options():
  ds = tiny()
  a = protocols.permuted(ds, "domain", 3, 9, jax.random.key(1))
  b = protocols.permuted(ds, "domain", 3, 9, jax.random.key(1), pad=0, permute_first=False)
  for x, y in zip(a.train[:3], b.train[:3]):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(a.train.inputs[0], ds.train_images[:9].reshape(9, 16))
