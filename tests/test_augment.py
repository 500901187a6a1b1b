"""ewc_jax.augment: crops are windows of the zero-padded image, flips mirror, keys decide."""

import dataclasses
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewc_jax import augment
from ewc_jax import errors


def test_docstring_examples():
  result = doctest.testmod(augment)
  assert result.attempted > 0 and result.failed == 0


def test_every_output_is_a_window_of_the_padded_image_maybe_mirrored():
  x = jax.random.normal(jax.random.key(1), (64, 6, 5, 3))
  y = np.asarray(augment.crop_and_flip(jax.random.key(2), x, padding=2))
  padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets, flips = set(), set()
  for i in range(len(x)):
    found = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
             if np.array_equal(y[i], (lambda win: win[:, ::-1] if f else win)(
                 padded[i, dy:dy + 6, dx:dx + 5]))]
    assert found, i
    offsets.add(found[0][:2])
    flips.add(found[0][2])
  assert len(offsets) > 10 and flips == {False, True}  # offsets and flips both vary


def test_same_key_same_batch_other_key_other_batch():
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
  a = augment.crop_and_flip(jax.random.key(3), x)
  b = jax.jit(augment.crop_and_flip, static_argnums=2)(jax.random.key(3), x, 4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, augment.crop_and_flip(jax.random.key(4), x))


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    augment.crop_and_flip(jax.random.key(0), jnp.zeros((4, 784)))
  with pytest.raises(errors.SettingError, match="`augment`='rotate' is invalid"):
    augment.make("rotate")
  assert augment.make("none") is None


def test_runner_augments_training_batches_only_and_deterministically():
  """Config.augment: a run differs from the un-augmented one, repeats itself bit for bit, and
  a 2-config sweep (vmapped) gives each config's single run."""
  from ewc_jax import continual  # pylint: disable=import-outside-toplevel
  from ewc_jax.continual import sweep  # pylint: disable=import-outside-toplevel
  import runs  # pylint: disable=import-outside-toplevel
  train, test = runs.image_tasks(48, 1), runs.image_tasks(24, 2)
  base = continual.Config(algo="ewc", hidden=(16,), epochs=1, batch_size=16, lam=10.0,
                          augment="crop_flip", chunk_steps=4)
  net = continual.make_network(base, [(0, 1)] * runs.T)
  a = continual.run(base, net, train, test)
  b = continual.run(base, net, train, test)
  plain = continual.run(dataclasses.replace(base, augment="none"), net, train, test)
  np.testing.assert_array_equal(a.acc_matrix, b.acc_matrix)
  assert a.curves == b.curves and a.curves != plain.curves
  swept = sweep.run(sweep.grid(base, seed=[0, 1]), net, train, test)
  np.testing.assert_allclose(swept.acc_matrix[0], a.acc_matrix, atol=1e-6)
  assert continual.Config(augment="crop_flip").augment == "crop_flip"
  with pytest.raises(errors.SettingError, match="`augment`='flip' is invalid"):
    continual.Config(augment="flip").validate()
