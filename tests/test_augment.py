"""ewc_jax.augment: crops are windows of the zero-padded image, flips mirror, keys decide."""

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
