"""Tests for ewc_jax.penalty: values and gradients against float64 numpy, stacked vs sequence
anchors, jit/grad/vmap, finite gradients at the anchor, argument and structure errors, non-dict
pytrees, the merged (p = 2) statistics and their float32 precision, and the parity penalties.

Speed: eager JAX compiles every primitive separately, so each test evaluates what it checks in
one or two jitted programs (anchors closed over, so their checks still run on concrete values).
Test data are numpy arrays."""

from __future__ import annotations

import re
from typing import NamedTuple

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewc_jax import penalty as penalty_lib
from ewc_jax.penalty import (Anchor, clarena_loss, empty_anchors, empty_merged, ewc_loss,
                             merge_anchor, merged_distance, seed_parity_loss, set_anchor,
                             stack_anchors, weighted_distance)

SHAPES = {"layer": {"w": (3, 4), "b": (4,)}, "out": {"w": (4, 2)}}
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run(fn, *args):
  """``jax.jit(fn)(*args)`` with a cheaper XLA compile (the maths is the same)."""
  return jax.jit(fn, compiler_options=_FAST_COMPILE)(*args)


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _tree(rng, scale=1.0, offset=0.0, low=None, shapes=SHAPES):
  """A float32 numpy pytree shaped like ``shapes``: normal(offset, scale), or uniform(low, 1)."""
  def leaf(s):
    v = rng.uniform(low, 1.0, size=s) if low is not None else offset + scale * rng.normal(size=s)
    return np.asarray(v, np.float32)
  return jax.tree.map(leaf, shapes, is_leaf=_is_shape)


def _anchors(rng, k, shapes=SHAPES):
  return [Anchor(params=_tree(rng, shapes=shapes), importance=_tree(rng, low=0.0, shapes=shapes))
          for _ in range(k)]


def _np_stack(anchors):
  """``stack_anchors`` in numpy (no device computation)."""
  return jax.tree.map(lambda *xs: np.stack(xs), *anchors)


def _f64(x):
  return np.asarray(x, np.float64)


def _np_ewc(params, anchors, lam, p):
  """(λ/2) Σ_k Σ_i F_ki |θ_i − θ*_ki|^p in float64."""
  total = 0.0
  for a in anchors:
    for t, r, f in zip(jax.tree.leaves(params), jax.tree.leaves(a.params),
                       jax.tree.leaves(a.importance)):
      total += np.sum(_f64(f) * np.abs(_f64(t) - _f64(r)) ** p)
  return 0.5 * lam * total


def _np_ewc_grad(params, anchors, lam, p):
  """d/dθ of :func:`_np_ewc` (the sign of 0 is 0: the subgradient the library uses)."""
  def leaf(t, *rf):
    k = len(rf) // 2
    out = np.zeros(np.shape(t))
    for r, f in zip(rf[:k], rf[k:]):
      d = _f64(t) - _f64(r)
      safe = np.where(d == 0, 1.0, np.abs(d))
      out += 0.5 * lam * _f64(f) * p * np.where(d == 0, 0.0, safe ** (p - 1) * np.sign(d))
    return out
  return jax.tree.map(leaf, params, *[a.params for a in anchors], *[a.importance for a in anchors])


def _np_seed(params, anchors, factor, p, task_id):
  total = 0.0
  for a in anchors:
    for t, r, f in zip(jax.tree.leaves(params), jax.tree.leaves(a.params),
                       jax.tree.leaves(a.importance)):
      d = (_f64(t) - _f64(r)).reshape(-1)
      total += factor * np.sum(_f64(f)) * np.sum(np.abs(d) ** p) ** (1.0 / p)
  return total / task_id if task_id > 1 else total


def assert_trees_close(a, b, rtol=1e-5, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(_f64(x), _f64(y), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# Values and gradients.

def test_ewc_loss_matches_numpy_for_p2_and_p15_with_2_and_3_anchors():
  rng = np.random.default_rng(0)
  params = _tree(rng)
  cases = {(p, k): _anchors(rng, k) for p in (2.0, 1.5) for k in (2, 3)}
  lam = 0.7
  def compute(q):
    out = {}
    for (p, k), anchors in cases.items():
      loss = lambda w: ewc_loss(w, anchors, lam=lam, p=p)  # noqa: E731, B023
      out[p, k] = {"seq": jax.value_and_grad(loss)(q),
                   "stacked": ewc_loss(q, stack_anchors(anchors), lam=lam, p=p),
                   "tuple": ewc_loss(q, tuple(anchors), lam=lam, p=p)}
    return out
  got = run(compute, params)
  for (p, k), anchors in cases.items():
    want = _np_ewc(params, anchors, lam, p)
    value, grad = got[p, k]["seq"]
    assert value.shape == () and value.dtype == jnp.float32
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    np.testing.assert_allclose(float(got[p, k]["stacked"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(got[p, k]["tuple"]), want, rtol=1e-5)
    # Summed over anchors, not averaged.
    np.testing.assert_allclose(float(value), sum(_np_ewc(params, [a], lam, p) for a in anchors),
                               rtol=1e-5)
    assert_trees_close(grad, _np_ewc_grad(params, anchors, lam, p), rtol=1e-5, atol=1e-6)
    if p == 2.0:  # the closed form λ Σ_k F_k (θ − θ*_k)
      want_g = jax.tree.map(lambda t, *rf: lam * sum(_f64(f) * (_f64(t) - _f64(r)) for r, f in
                                                     zip(rf[:k], rf[k:])),
                            params, *[a.params for a in anchors], *[a.importance for a in anchors])
      assert_trees_close(grad, want_g, rtol=1e-5, atol=1e-6)


def test_zero_at_the_anchor_and_positive_elsewhere():
  rng = np.random.default_rng(1)
  (anchor,) = _anchors(rng, 1)
  moved = jax.tree.map(lambda x: x + np.float32(0.1), anchor.params)
  def compute(at, away):
    return {p: (jax.value_and_grad(lambda q: ewc_loss(q, [anchor], lam=3.0, p=p))(at),  # noqa: B023
                ewc_loss(away, [anchor], lam=3.0, p=p))
            for p in (2.0, 1.5, 1.0, 0.5)}
  got = run(compute, anchor.params, moved)
  for p, ((value, grad), away) in got.items():
    assert float(value) == 0.0
    for leaf in jax.tree.leaves(grad):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    np.testing.assert_allclose(float(away), _np_ewc(moved, [anchor], 3.0, p), rtol=1e-5)
    assert float(away) > 0


def test_sequence_and_stacked_anchors_are_identical():
  rng = np.random.default_rng(4)
  params, anchors = _tree(rng), _anchors(rng, 3)
  stacked = stack_anchors(anchors)
  def compute(q):
    # A bigger stack whose unused zero-importance slots must contribute nothing.
    bigger = empty_anchors(q, 5)
    for k, a in enumerate(anchors):
      bigger = set_anchor(bigger, k, a)
    out = {}
    for p in (2.0, 1.5):
      for name, arg in (("seq", anchors), ("stacked", stacked), ("bigger", bigger)):
        out[p, name] = jax.value_and_grad(lambda w: ewc_loss(w, arg, lam=0.5, p=p))(q)  # noqa: B023
    return out
  got = run(compute, params)
  for p in (2.0, 1.5):
    for name in ("stacked", "bigger"):
      np.testing.assert_allclose(float(got[p, name][0]), float(got[p, "seq"][0]), rtol=1e-6)
      assert_trees_close(got[p, name][1], got[p, "seq"][1], rtol=1e-6)
    np.testing.assert_allclose(float(got[p, "seq"][0]), _np_ewc(params, anchors, 0.5, p),
                               rtol=1e-5)


def test_empty_sequence_gives_zero():
  params = _tree(np.random.default_rng(5))
  got = run(lambda q: [jax.value_and_grad(lambda w: ewc_loss(w, e, lam=1.0))(q)  # noqa: B023
                       for e in ([], ())], params)
  for value, grad in got:
    assert float(value) == 0.0
    assert jax.tree.structure(grad) == jax.tree.structure(params)
    for leaf in jax.tree.leaves(grad):
      np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  with pytest.raises(ValueError, match="anchors"):
    stack_anchors([])


def test_finite_gradient_at_the_anchor_for_p1_and_p05():
  rng = np.random.default_rng(6)
  anchors = _anchors(rng, 2)
  at = anchors[0].params   # exactly on anchor 0, away from anchor 1
  def compute(q):
    out = {}
    for p in (1.0, 0.5):
      for name, arg in (("seq", anchors), ("stacked", stack_anchors(anchors)),
                        ("rest", anchors[1:])):
        out[p, name] = jax.grad(lambda w: ewc_loss(w, arg, lam=1.0, p=p))(q)  # noqa: B023
    return out
  got = run(compute, at)
  for p in (1.0, 0.5):
    for name in ("seq", "stacked"):
      for leaf in jax.tree.leaves(got[p, name]):
        assert np.all(np.isfinite(np.asarray(leaf)))
      # Anchor 0 contributes a zero (sub)gradient there, so only anchor 1 remains.
      assert_trees_close(got[p, name], got[p, "rest"], rtol=1e-6)
    assert_trees_close(got[p, "seq"], _np_ewc_grad(at, anchors, 1.0, p), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Transformations.

def test_jit_grad_and_vmap_over_lambda_and_params():
  rng = np.random.default_rng(7)
  params, anchors = _tree(rng), _anchors(rng, 2)
  batch = [_tree(rng) for _ in range(4)]
  base = _np_ewc(params, anchors, 1.0, 2.0)
  def compute(q, lams, lam, anchors_traced, batched):
    return {
        "vmap_lam": jax.vmap(lambda l: ewc_loss(q, anchors, lam=l))(lams),
        "traced_lam": ewc_loss(q, anchors, lam=lam),        # traced λ: no check error
        "traced_all": jax.value_and_grad(lambda w: ewc_loss(w, anchors_traced, lam=lam))(q),
        "grad_lam": jax.grad(lambda l: ewc_loss(q, anchors, lam=l))(lam),
        "vmap_params": jax.vmap(lambda w: ewc_loss(w, anchors, lam=0.3, p=1.5))(batched),
    }
  got = run(compute, params, jnp.array([1.0, 2.0, 3.0]), 2.5, anchors,
            jax.tree.map(lambda *xs: np.stack(xs), *batch))
  np.testing.assert_allclose(np.asarray(got["vmap_lam"]), base * np.array([1.0, 2.0, 3.0]),
                             rtol=1e-5)
  np.testing.assert_allclose(float(got["traced_lam"]), 2.5 * base, rtol=1e-5)
  np.testing.assert_allclose(float(got["traced_all"][0]), 2.5 * base, rtol=1e-5)
  assert_trees_close(got["traced_all"][1], _np_ewc_grad(params, anchors, 2.5, 2.0), rtol=1e-5,
                     atol=1e-6)
  np.testing.assert_allclose(float(got["grad_lam"]), base, rtol=1e-5)   # dR/dλ = R/λ
  np.testing.assert_allclose(np.asarray(got["vmap_params"]),
                             [_np_ewc(q, anchors, 0.3, 1.5) for q in batch], rtol=1e-5)


def test_traced_p_under_jit_matches_numpy():
  rng = np.random.default_rng(8)
  params, anchors = _tree(rng), _anchors(rng, 2)
  f = jax.jit(jax.value_and_grad(lambda q, p: ewc_loss(q, anchors, lam=1.0, p=p)),
              compiler_options=_FAST_COMPILE)
  for p in (2.0, 1.5, 3.0):
    value, grad = f(params, p)
    np.testing.assert_allclose(float(value), _np_ewc(params, anchors, 1.0, p), rtol=1e-5)
    assert_trees_close(grad, _np_ewc_grad(params, anchors, 1.0, p), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Errors.

@pytest.mark.parametrize("kwargs, needle", [
    (dict(lam=-1.0), "lam=-1"),
    (dict(lam=float("nan")), "lam=nan"),
    (dict(lam=float("inf")), "lam=inf"),
    (dict(lam=np.array([1.0, -3.0])), "lam=-3"),
    (dict(lam=1.0, p=0.0), "p=0"),
    (dict(lam=1.0, p=-2.0), "p=-2"),
])
def test_bad_lambda_or_p_raise(kwargs, needle):
  rng = np.random.default_rng(11)
  params, anchors = _tree(rng), _anchors(rng, 1)
  with pytest.raises(ValueError, match=re.escape(needle)):
    ewc_loss(params, anchors, **kwargs)
  factor_kwargs = {"factor" if k == "lam" else k: v for k, v in kwargs.items()}
  factor_needle = needle.replace("lam", "factor")
  with pytest.raises(ValueError, match=re.escape(factor_needle)):
    seed_parity_loss(params, anchors, **factor_kwargs)
  if "p" not in kwargs:
    with pytest.raises(ValueError, match=re.escape(factor_needle)):
      clarena_loss(params, anchors, **factor_kwargs)


def test_a_traced_bad_lambda_or_p_gives_nan_never_a_silently_wrong_penalty():
  """Under jit no check can raise: a negative or non-finite traced λ (or p <= 0, or the reference
  modes' factor) makes the value and the gradient NaN, while a valid traced λ gives exactly the
  eager numbers."""
  rng = np.random.default_rng(16)
  params, anchors = _tree(rng), _anchors(rng, 2)
  f = jax.jit(jax.value_and_grad(lambda q, lam, p: ewc_loss(q, anchors, lam=lam, p=p)),
              compiler_options=_FAST_COMPILE)
  for lam, p in ((-1.0, 2.0), (float("nan"), 2.0), (float("inf"), 2.0), (1.0, 0.0),
                 (1.0, -2.0)):
    value, grad = f(params, lam, p)
    assert np.isnan(float(value)), (lam, p)
    assert all(np.all(np.isnan(g)) for g in jax.tree.leaves(grad)), (lam, p)
  value, grad = f(params, 2.5, 2.0)
  want_value, want_grad = jax.value_and_grad(lambda q: ewc_loss(q, anchors, lam=2.5))(params)
  assert float(value) == float(want_value)
  assert_trees_close(grad, want_grad, rtol=0, atol=0)
  bad_factor = jax.jit(lambda q, fa: seed_parity_loss(q, anchors, factor=fa, p=2.0))
  assert np.isnan(float(bad_factor(params, -1.0)))
  assert np.isfinite(float(bad_factor(params, 1.0)))


def test_anchor_refuses_importance_of_another_structure_or_shape_when_built():
  rng = np.random.default_rng(17)
  params, importance = _tree(rng), _tree(rng, low=0.0)
  with pytest.raises(ValueError, match=re.escape("`Anchor.importance` does not match "
                                                 "`Anchor.params`: leaf ['layer']['b'] is missing")):
    Anchor(params=params, importance={"layer": {"w": importance["layer"]["w"]},
                                      "out": importance["out"]})
  with pytest.raises(ValueError, match=re.escape("leaf ['out']['w'] has shape (4, 1)")):
    Anchor(params=params, importance={**importance, "out": {"w": np.ones((4, 1), np.float32)}})


def test_reference_modes_refuse_factor_zero():
  # The reference raises for parameter_change_reg_factor <= 0; ewc_loss's lam=0 means "off".
  rng = np.random.default_rng(11)
  params, anchors = _tree(rng), _anchors(rng, 1)
  for fn in (seed_parity_loss, clarena_loss):
    with pytest.raises(ValueError, match=re.escape("factor=0")):
      fn(params, anchors, factor=0.0)


@pytest.mark.parametrize("bad, value", [(-1.0, "-1"), (float("nan"), "nan"), (float("inf"), "inf")])
@pytest.mark.parametrize("stacked", [False, True])
def test_bad_importance_names_importance_and_leaf(bad, value, stacked):
  rng = np.random.default_rng(12)
  params, anchors = _tree(rng), _anchors(rng, 2)
  anchors[1].importance["layer"]["w"][1, 2] = bad
  arg = _np_stack(anchors) if stacked else anchors
  for fn in (lambda: ewc_loss(params, arg, lam=1.0),
             lambda: seed_parity_loss(params, arg, factor=1.0)):
    with pytest.raises(ValueError) as err:
      fn()
    msg = str(err.value)
    assert "importance" in msg and "['layer']['w']" in msg and value in msg, msg
    if not stacked:
      assert "anchors[1]" in msg


@pytest.mark.parametrize("field", ["params", "importance"])
@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_structure_mismatch_names_the_leaf(field, case):
  rng = np.random.default_rng(13)
  params, (anchor,) = _tree(rng), _anchors(rng, 1)
  tree = getattr(anchor, field)
  if case == "missing":
    tree, path = {"layer": {"w": tree["layer"]["w"]}, "out": tree["out"]}, "['layer']['b']"
  elif case == "extra":
    tree, path = {**tree, "layer": {**tree["layer"], "c": np.ones(2)}}, "['layer']['c']"
  else:
    tree, path = {**tree, "out": {"w": np.ones((2, 4))}}, "['out']['w']"
  anchor = anchor._replace(**{field: tree})
  for arg in ([anchor], _np_stack([anchor])):
    with pytest.raises(ValueError) as err:
      ewc_loss(params, arg, lam=1.0)
    msg = str(err.value)
    assert path in msg and field in msg, msg
    if case == "shape":
      assert "(2, 4)" in msg and "(4, 2)" in msg, msg


@pytest.mark.parametrize("bad", [{"a": 1}, 3.0, "anchors", None])
def test_anchors_must_be_a_sequence(bad):
  params = _tree(np.random.default_rng(14))
  with pytest.raises(ValueError, match="anchors"):
    ewc_loss(params, bad, lam=1.0)


def test_anchor_elements_must_be_anchors():
  rng = np.random.default_rng(15)
  params, (anchor,) = _tree(rng), _anchors(rng, 1)
  with pytest.raises(ValueError, match=re.escape("anchors[1]")):
    ewc_loss(params, [anchor, params], lam=1.0)
  # A plain (params, importance) pair is accepted as an anchor.
  got = run(lambda q: ewc_loss(q, [tuple(anchor)], lam=1.0), params)
  np.testing.assert_allclose(float(got), _np_ewc(params, [anchor], 1.0, 2.0), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Non-dict pytrees.

class Pair(NamedTuple):
  w: jax.Array
  b: jax.Array


@flax.struct.dataclass
class FlaxParams:
  w: jax.Array
  b: jax.Array
  scale: jax.Array


@chex.dataclass
class ChexParams:
  w: jax.Array
  b: jax.Array


def _make(kind, rng, low=None):
  def v(*s):
    return np.asarray(rng.uniform(low, 1.0, s) if low is not None else rng.normal(size=s),
                      np.float32)
  if kind == "tuple3":   # three leaves in a tuple (a tree of triples must not confuse anything)
    return (v(3, 2), v(2), v(4))
  if kind == "list":
    return [v(3, 2), {"b": v(2)}]
  if kind == "namedtuple":
    return {"a": Pair(w=v(3, 2), b=v(2)), "c": Pair(w=v(2, 2), b=v(2))}
  if kind == "flax_struct":
    return FlaxParams(w=v(3, 2), b=v(2), scale=v())
  return ChexParams(w=v(3, 2), b=v(2))


@pytest.mark.parametrize("kind", ["tuple3", "list", "namedtuple", "flax_struct", "chex"])
def test_non_dict_pytrees(kind):
  rng = np.random.default_rng(16)
  params = _make(kind, rng)
  anchors = [Anchor(_make(kind, rng), _make(kind, rng, low=0.0)) for _ in range(3)]
  def compute(q):
    merged = empty_merged(q)
    for a in anchors:
      merged = merge_anchor(merged, a)
    return {"p2": jax.value_and_grad(lambda w: ewc_loss(w, anchors, lam=0.4))(q),
            "p15": ewc_loss(q, stack_anchors(anchors), lam=0.4, p=1.5),
            "merged": merged,
            "merged_vg": jax.value_and_grad(lambda w: 0.2 * merged_distance(w, merged))(q),
            "seed": seed_parity_loss(q, anchors, factor=1.0, task_id=2)}
  got = run(compute, params)
  value, grad = got["p2"]
  np.testing.assert_allclose(float(value), _np_ewc(params, anchors, 0.4, 2.0), rtol=1e-5)
  assert jax.tree.structure(grad) == jax.tree.structure(params)
  assert_trees_close(grad, _np_ewc_grad(params, anchors, 0.4, 2.0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(got["p15"]), _np_ewc(params, anchors, 0.4, 1.5), rtol=1e-5)
  # Merged statistics keep the tree and give the same value and gradient (0.2 = λ/2).
  assert jax.tree.structure(got["merged"].weight) == jax.tree.structure(params)
  assert jax.tree.structure(got["merged"].center) == jax.tree.structure(params)
  np.testing.assert_allclose(float(got["merged_vg"][0]), float(value), rtol=1e-5)
  assert_trees_close(got["merged_vg"][1], grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(got["seed"]), _np_seed(params, anchors, 1.0, 2.0, 2),
                             rtol=1e-5)


def test_mismatched_node_types_raise_value_error():
  rng = np.random.default_rng(17)
  params = _make("namedtuple", rng)
  other = {k: {"w": v.w, "b": v.b} for k, v in params.items()}
  with pytest.raises(ValueError, match="does not match"):
    ewc_loss(params, [Anchor(other, jax.tree.map(np.abs, other))], lam=1.0)


# ----------------------------------------------------------------------------------------------
# Merged statistics (p = 2).

def _merge_all(params, anchors, decay=1.0):
  merged = empty_merged(params)
  for a in anchors:
    merged = merge_anchor(merged, a, decay)
  return merged


def test_merged_equals_weighted_distance_value_and_gradient():
  cases = []
  for seed in range(3):
    rng = np.random.default_rng(100 + seed)
    anchors = _anchors(rng, 3)
    for a in anchors:   # some exact zeros (A = 0 there: the centre falls back to θ*)
      for leaf in jax.tree.leaves(a.importance):
        leaf[0] = 0.0
    cases.append((anchors, [_tree(rng) for _ in range(3)]))
  def compute():
    out = []
    for anchors, thetas in cases:
      merged, stacked = _merge_all(anchors[0].params, anchors), stack_anchors(anchors)
      out.append((merged, [(jax.value_and_grad(merged_distance)(t, merged),
                            jax.value_and_grad(weighted_distance)(t, stacked)) for t in thetas]))
    return out
  got = run(compute)
  for (anchors, thetas), (merged, results) in zip(cases, got):
    for leaf in jax.tree.leaves(merged):
      assert np.all(np.isfinite(np.asarray(leaf)))
    for theta, ((m_val, m_grad), (w_val, w_grad)) in zip(thetas, results):
      want = _np_ewc(theta, anchors, 2.0, 2.0)
      np.testing.assert_allclose(float(m_val), float(w_val), rtol=1e-5)
      np.testing.assert_allclose(float(m_val), want, rtol=1e-5)
      assert_trees_close(m_grad, w_grad, rtol=1e-5, atol=1e-6)
      assert_trees_close(m_grad, _np_ewc_grad(theta, anchors, 2.0, 2.0), rtol=1e-5, atol=1e-6)


def test_merged_keeps_float32_precision_near_the_anchors():
  """θ and every θ*_k within ~1e-4 of each other, around 1: the naive A θ² − 2 B θ + C
  cancels all its digits in float32; the centred form keeps ~1e-4 relative."""
  shapes = {"a": (30, 20), "b": (20,)}
  cases = []
  for seed in range(3):
    rng = np.random.default_rng(200 + seed)
    base = jax.tree.map(lambda s: 1.0 + 0.1 * rng.normal(size=s), shapes, is_leaf=_is_shape)
    near = lambda: jax.tree.map(  # noqa: E731
        lambda b: np.asarray(b + 1e-4 * rng.normal(size=b.shape), np.float32), base)  # noqa: B023
    cases.append(([Anchor(near(), _tree(rng, low=0.1, shapes=shapes)) for _ in range(3)], near()))
  got = run(lambda: [merged_distance(t, _merge_all(t, a)) for a, t in cases])
  for (anchors, theta), value in zip(cases, got):
    want = _np_ewc(theta, anchors, 2.0, 2.0)
    np.testing.assert_allclose(float(value), want, rtol=1e-4)
    # The check can fail: the uncentred form, in float32, is off by more than 50 %.
    f = [jax.tree.leaves(a.importance) for a in anchors]
    r = [jax.tree.leaves(a.params) for a in anchors]
    naive = np.float32(0.0)
    for i, t in enumerate(jax.tree.leaves(theta)):
      a_ = sum(fk[i] for fk in f)
      b_ = sum(fk[i] * rk[i] for fk, rk in zip(f, r))
      c_ = sum(np.sum(fk[i] * rk[i] * rk[i]) for fk, rk in zip(f, r))
      naive += np.sum(a_ * t * t - 2 * b_ * t) + c_
    assert abs(float(naive) - want) > 0.5 * want


def test_merge_anchor_with_decay_gives_decayed_statistics():
  rng = np.random.default_rng(300)
  a1, a2, a3 = _anchors(rng, 3)
  thetas = [_tree(rng) for _ in range(3)]
  gamma = 0.6
  def compute(g):
    merged = merge_anchor(merge_anchor(merge_anchor(empty_merged(a1.params), a1), a2, g), a3, g)
    return merged, [jax.value_and_grad(merged_distance)(t, merged) for t in thetas]
  merged, results = run(compute, gamma)   # a traced decay
  # weight = γ² F1 + γ F2 + F3, and the distance is γ² d1 + γ d2 + d3 for every θ.
  assert_trees_close(merged.weight,
                     jax.tree.map(lambda f1, f2, f3: gamma ** 2 * _f64(f1) + gamma * _f64(f2) + f3,
                                  a1.importance, a2.importance, a3.importance), rtol=1e-6)
  weights = (gamma ** 2, gamma, 1.0)
  for theta, (value, grad) in zip(thetas, results):
    want = sum(w * _np_ewc(theta, [a], 2.0, 2.0) for w, a in zip(weights, (a1, a2, a3)))
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    want_g = jax.tree.map(lambda *gs: sum(w * g for w, g in zip(weights, gs)),
                          *[_np_ewc_grad(theta, [a], 2.0, 2.0) for a in (a1, a2, a3)])
    assert_trees_close(grad, want_g, rtol=1e-5, atol=1e-6)
  # An empty merged contributes nothing.
  assert float(run(lambda t: merged_distance(t, empty_merged(t)), thetas[0])) == 0.0


# ----------------------------------------------------------------------------------------------
# Parity penalties.

def _two_layer(rng, positive=False):
  tree = {"fc1": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=(3,))},
          "fc2": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=(2,))}}
  return jax.tree.map(lambda x: np.asarray(np.abs(x) if positive else x, np.float32), tree)


def test_seed_parity_loss_matches_numpy():
  rng = np.random.default_rng(400)
  params = _two_layer(rng)
  anchors = [Anchor(_two_layer(rng), _two_layer(rng, positive=True)) for _ in range(2)]
  factor = 0.8
  cases = [(p, t) for p in (2.0, 1.0) for t in (1, 3)]
  def compute(q, task_ids):
    bigger = set_anchor(set_anchor(empty_anchors(q, 3), 0, anchors[0]), 1, anchors[1])
    out = {}
    for i, (p, t) in enumerate(cases):
      loss = lambda w, a, tid: seed_parity_loss(w, a, factor=factor, p=p, task_id=tid)  # noqa: E731, B023
      out[p, t] = {
          "value": loss(q, anchors, t),
          "stacked_traced_tid": loss(q, bigger, task_ids[i]),   # unused slot + traced task id
          "grad": jax.grad(loss)(q, anchors, t),
          "grad_at_anchor": jax.grad(loss)(anchors[0].params, anchors[:1], t),
          "grad_at_anchor_2": jax.grad(loss)(anchors[0].params, anchors, t),
      }
    return out
  got = run(compute, params, jnp.array([t for _, t in cases]))
  for p, t in cases:
    g = got[p, t]
    want = _np_seed(params, anchors, factor, p, t)
    np.testing.assert_allclose(float(g["value"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(g["stacked_traced_tid"]), want, rtol=1e-5)
    # d/dW of ΣF·‖W − W*‖_p = ΣF · sign(d)|d|^(p−1) / ‖d‖_p^(p−1).
    def leaf(w, *rf):
      out = 0.0
      for r, f in zip(rf[:2], rf[2:]):
        d = _f64(w) - _f64(r)
        norm = np.sum(np.abs(d) ** p) ** (1 / p)
        out = out + factor * np.sum(_f64(f)) * np.sign(d) * np.abs(d) ** (p - 1) / norm ** (p - 1)
      return out / t if t > 1 else out
    want_g = jax.tree.map(leaf, params, *[a.params for a in anchors],
                          *[a.importance for a in anchors])
    assert_trees_close(g["grad"], want_g, rtol=1e-5, atol=1e-6)
    # Finite at W = W*: exactly zero for the anchor sitting there.
    for leaf_ in jax.tree.leaves(g["grad_at_anchor"]):
      np.testing.assert_array_equal(np.asarray(leaf_), 0.0)
    for leaf_ in jax.tree.leaves(g["grad_at_anchor_2"]):
      assert np.all(np.isfinite(np.asarray(leaf_)))
  # Not EWC: the per-tensor norm is not raised to p, and the importance is summed per tensor.
  assert abs(float(got[2.0, 1]["value"]) - _np_ewc(params, anchors, 2 * factor, 2.0)) > 0.1


def test_clarena_loss_is_half_factor_sum_f_squared_difference():
  rng = np.random.default_rng(402)
  params = _two_layer(rng)
  anchors = [Anchor(_two_layer(rng), _two_layer(rng, positive=True)) for _ in range(3)]
  factor = 2.5
  want = 0.5 * factor * sum(
      np.sum(_f64(f) * (_f64(t) - _f64(r)) ** 2)
      for a in anchors for t, r, f in zip(jax.tree.leaves(params), jax.tree.leaves(a.params),
                                          jax.tree.leaves(a.importance)))
  got = run(lambda q: (clarena_loss(q, anchors, factor=factor), clarena_loss(q, [], factor=factor)),
            params)
  np.testing.assert_allclose(float(got[0]), want, rtol=1e-5)
  assert float(got[1]) == 0.0


def test_abs_pow_is_exact_square_for_p2_and_safe_at_zero():
  x = np.array([-2.0, 0.0, 0.5], np.float32)
  ps = (0.5, 1.0, 1.5, 3.0)
  def compute(v):
    return (penalty_lib.abs_pow(v, 2),
            [(penalty_lib.abs_pow(v, p), jax.grad(lambda u: jnp.sum(penalty_lib.abs_pow(u, p)))(v))  # noqa: B023
             for p in ps])
  sq, rest = run(compute, x)
  np.testing.assert_array_equal(np.asarray(sq), [4.0, 0.0, 0.25])
  for p, (value, grad) in zip(ps, rest):
    np.testing.assert_allclose(np.asarray(value), np.abs(x) ** p, rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad))) and float(grad[1]) == 0.0
    nz = x[[0, 2]]
    np.testing.assert_allclose(np.asarray(grad)[[0, 2]], p * np.abs(nz) ** (p - 1) * np.sign(nz),
                               rtol=1e-5)


@pytest.mark.parametrize("decay", [0.0, -0.5, 1.5, float("nan")])
def test_merge_anchor_decay_outside_unit_interval_names_decay(decay):
  rng = np.random.default_rng(0)
  anchor = _anchors(rng, 1)[0]
  with pytest.raises(ValueError, match=re.escape(f"decay={decay:g}")):
    merge_anchor(empty_merged(anchor.params), anchor, decay)
