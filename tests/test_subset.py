"""ewc_jax.subset.random_rows: n valid rows, uniformly at random, drawn from a key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewc_jax import subset


def test_keeps_exactly_n_valid_rows_and_never_padding():
  valid = jnp.arange(50) < 37
  for k in range(5):
    keep = np.asarray(subset.random_rows(jax.random.key(k), valid, 10))
    assert keep.sum() == 10
    assert not keep[37:].any()


def test_all_valid_rows_when_n_is_at_least_their_number():
  valid = jnp.array([True, False, True, True, False])
  for n in (3, 4, 1000):
    np.testing.assert_array_equal(subset.random_rows(jax.random.key(0), valid, n), valid)


def test_same_key_same_rows_other_key_other_rows():
  valid = jnp.ones(100, bool)
  a = subset.random_rows(jax.random.key(1), valid, 20)
  np.testing.assert_array_equal(a, subset.random_rows(jax.random.key(1), valid, 20))
  assert not np.array_equal(a, subset.random_rows(jax.random.key(2), valid, 20))


def test_every_valid_row_equally_likely():
  """Over 4000 keys each of the 8 valid rows is kept with probability n / 8 = 3/8 (binomial
  std ≈ 0.0077: 5 std allowed), the padded rows never."""
  valid = jnp.arange(10) < 8
  keys = jax.random.split(jax.random.key(0), 4000)
  keep = jax.vmap(lambda k: subset.random_rows(k, valid, 3))(keys)
  freq = np.asarray(keep).mean(axis=0)
  np.testing.assert_allclose(freq[:8], 3 / 8, atol=0.04)
  assert freq[8:].tolist() == [0.0, 0.0]
  assert np.all(np.asarray(keep).sum(axis=1) == 3)


def test_traced_n_and_mask():
  f = jax.jit(lambda key, valid, n: subset.random_rows(key, valid, n))
  keep = f(jax.random.key(0), jnp.arange(20) < 15, jnp.int32(4))
  assert int(keep.sum()) == 4


@pytest.mark.parametrize("n", [0, -3, True])
def test_refuses_bad_n(n):
  with pytest.raises(ValueError, match="`n` must be an integer >= 1"):
    subset.random_rows(jax.random.key(0), jnp.ones(4, bool), n)


def test_refuses_a_mask_that_is_not_a_row_vector():
  with pytest.raises(ValueError, match=r"`valid` must be a \[N\] row mask"):
    subset.random_rows(jax.random.key(0), jnp.ones((2, 3), bool), 1)
