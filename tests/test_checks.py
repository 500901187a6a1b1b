"""Checks that mean the same eagerly and under jit, and clear messages for wrong inputs
(findings 3 and 4 of issue 14)."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewc_jax import Anchor, ewc_loss, fisher_diagonal, stack_anchors


def _fn(p, x):
  return jnp.tanh(x @ p["w1"]) @ p["w2"]


def _problem(seed=0, n=12):
  rng = np.random.default_rng(seed)
  p = {"w1": rng.normal(size=(4, 5)).astype(np.float32),
       "w2": rng.normal(size=(5, 3)).astype(np.float32)}
  x = rng.normal(size=(n, 4)).astype(np.float32)
  return p, x, (np.arange(n) % 3).astype(np.int32)


def _anchor(seed=1):
  p, x, y = _problem(seed)
  return Anchor(p, fisher_diagonal(_fn, p, x, y))


# ----------------------------------------------------------------------------------------------
# Finding 3: λ and importance.

@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_lam_zero_is_off_value_and_gradient_exactly_zero(mode):
  p, _, _ = _problem(2)
  anchors = (_anchor(),)
  f = jax.value_and_grad(lambda q, lam: ewc_loss(q, anchors, lam=lam))
  if mode == "jit":
    f = jax.jit(f)
  value, grad = f(p, 0.0)
  assert float(value) == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grad))
  value, _ = f(p, 1.0)
  assert float(value) > 0


def test_negative_lam_refused_eagerly():
  p, _, _ = _problem(2)
  with pytest.raises(ValueError, match=re.escape("lam=-1")):
    ewc_loss(p, (_anchor(),), lam=-1.0)


@pytest.mark.parametrize("bad, shown", [(-1.0, "-1"), (np.nan, "nan"), (np.inf, "inf")])
def test_bad_importance_refused_when_the_anchor_is_built(bad, shown):
  p, _, _ = _problem()
  imp = jax.tree.map(np.ones_like, p)
  imp["w2"][2, 1] = bad
  with pytest.raises(ValueError) as err:
    Anchor(params=p, importance=imp)
  assert "importance" in str(err.value) and "['w2']" in str(err.value) and shown in str(err.value)
  # Traced importance (an Anchor built inside jit) cannot be checked: it is let through.
  jax.jit(lambda q, f: ewc_loss(q, (Anchor(q, f),), lam=1.0))(p, imp)


def test_non_finite_fisher_is_refused_when_returned():
  p, x, y = _problem()
  x[3, 0] = np.nan
  with pytest.raises(ValueError, match=r"non-finite importance at leaf \['w1'\]"):
    fisher_diagonal(_fn, p, x, y)
  mask = np.ones(len(y))
  mask[3] = 0                                  # the bad row masked out: fine
  fisher_diagonal(_fn, p, x, y, mask=mask)


# ----------------------------------------------------------------------------------------------
# Finding 4: garbage in.

@pytest.mark.parametrize("labels, needle", [
    (np.array([0, 1, 2, 3] * 3, np.int32), "labels[3]=3"),
    (np.array([0, -1, 2, 0] * 3, np.int32), "labels[1]=-1"),
    (np.array([0.0, 1.0, 2.0, 0.0] * 3, np.float32), "dtype float32"),
])
def test_bad_labels_refused(labels, needle):
  p, x, _ = _problem()
  for kind in ("empirical", "batch_squared"):
    with pytest.raises(ValueError, match=re.escape(needle)) as err:
      fisher_diagonal(_fn, p, x, labels, kind=kind)
    assert "[0, 3)" in str(err.value)
  if labels.dtype == np.float32:   # the dtype is known under jit too
    with pytest.raises(ValueError, match="dtype float32"):
      jax.jit(lambda y: fisher_diagonal(_fn, p, x, y))(labels)


def test_out_of_range_labels_in_masked_rows_are_ignored():
  p, x, y = _problem()
  y = y.copy()
  y[5] = -1
  mask = np.ones(len(y))
  mask[5] = 0
  fisher_diagonal(_fn, p, x, y, mask=mask)


class WithBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(3)(x)


def test_logits_fn_returning_logits_and_updates_is_explained():
  m = WithBatchNorm()
  _, x, y = _problem()
  variables = m.init(jax.random.key(0), x[:2], train=False)
  fn = lambda p, xb: m.apply({"params": p, "batch_stats": variables["batch_stats"]}, xb,  # noqa: E731
                             train=True, mutable=["batch_stats"])
  with pytest.raises(ValueError, match=r"returned a tuple of 2 .*mutable"):
    fisher_diagonal(fn, variables["params"], x, y)


def test_one_dimensional_logits_are_explained():
  p, x, y = _problem()
  with pytest.raises(ValueError, match=re.escape("returned shape (3,)")):
    fisher_diagonal(lambda q, xb: _fn(q, xb)[0], p, x, y)
  with pytest.raises(ValueError, match=re.escape("returned shape ()")):
    fisher_diagonal(lambda q, xb: _fn(q, xb).sum(), p, x, y)


def test_bare_anchor_instead_of_a_sequence_is_explained():
  p, _, _ = _problem(2)
  anchor = _anchor()
  with pytest.raises(ValueError, match=re.escape("anchors=(anchor,)")):
    ewc_loss(p, anchor, lam=1.0)
  # A stacked anchor (leading task axis) is still accepted as it was.
  np.testing.assert_allclose(float(ewc_loss(p, stack_anchors([anchor]), lam=1.0)),
                             float(ewc_loss(p, (anchor,), lam=1.0)), rtol=1e-6)


def test_dict_inputs_work():
  p, x, y = _problem()
  inputs = {"a": x[:, :2], "b": x[:, 2:]}
  fn = lambda q, xb: _fn(q, jnp.concatenate([xb["a"], xb["b"]], axis=1))  # noqa: E731
  want = fisher_diagonal(_fn, p, x, y, batch_size=5, method="vmap")
  for method in ("auto", "vmap"):
    got = fisher_diagonal(fn, p, inputs, y, batch_size=5, method=method)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5)
  with pytest.raises(ValueError, match=re.escape("leaf ['b'] of `inputs`")):
    fisher_diagonal(fn, p, {"a": x, "b": x[:5]}, y)
