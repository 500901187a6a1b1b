"""Leaf masks for fisher_diagonal and ewc_loss (finding 5 of issue 14), as in optax.masked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewc_jax import Anchor, ewc_loss, fisher_diagonal, path_mask
from ewc_jax import masks


def _fn(p, x):
  h = jnp.tanh(x @ p["body"]["w"] + p["body"]["b"])
  return h @ p["head"]["w"]


def _problem():
  rng = np.random.default_rng(0)
  p = {"body": {"w": rng.normal(size=(4, 5)).astype(np.float32),
                "b": rng.normal(size=(5,)).astype(np.float32)},
       "head": {"w": rng.normal(size=(5, 3)).astype(np.float32)}}
  x = rng.normal(size=(9, 4)).astype(np.float32)
  return p, x, (np.arange(9) % 3).astype(np.int32)


MASKS = {
    "tree": {"body": {"w": True, "b": True}, "head": {"w": False}},
    "prefix": {"body": True, "head": False},
    "callable": lambda p: {"body": True, "head": False},
    "path": path_mask(lambda path, leaf: path[0] == "body"),
}


@pytest.mark.parametrize("form", list(MASKS))
def test_fisher_with_a_mask_weighs_the_masked_leaves_only(form):
  p, x, y = _problem()
  full = fisher_diagonal(_fn, p, x, y)
  got = fisher_diagonal(_fn, p, x, y, leaf_mask=MASKS[form])
  assert jax.tree.structure(got) == jax.tree.structure(full)
  np.testing.assert_array_equal(got["head"]["w"], 0)
  for k in ("w", "b"):
    np.testing.assert_allclose(got["body"][k], full["body"][k], rtol=1e-6)
  n_body = 4 * 5 + 5
  norm = fisher_diagonal(_fn, p, x, y, leaf_mask=MASKS[form], normalize_by_num_params=True)
  np.testing.assert_allclose(norm["body"]["w"], full["body"]["w"] / n_body, rtol=1e-6)


@pytest.mark.parametrize("form", list(MASKS))
def test_ewc_loss_with_a_mask_penalises_the_masked_leaves_only(form):
  p, x, y = _problem()
  anchor = Anchor(p, fisher_diagonal(_fn, p, x, y))
  q = jax.tree.map(lambda v: v + 0.5, p)
  f = jax.value_and_grad(lambda t: ewc_loss(t, (anchor,), lam=2.0, leaf_mask=MASKS[form]))
  value, grad = f(q)
  body_only = Anchor(p, {**anchor.importance,
                         "head": jax.tree.map(jnp.zeros_like, anchor.importance["head"])})
  want_v, want_g = jax.value_and_grad(lambda t: ewc_loss(t, (body_only,), lam=2.0))(q)
  np.testing.assert_allclose(float(value), float(want_v), rtol=1e-6)
  np.testing.assert_array_equal(grad["head"]["w"], 0)
  np.testing.assert_allclose(grad["body"]["w"], want_g["body"]["w"], rtol=1e-6)
  assert float(value) < float(ewc_loss(q, (anchor,), lam=2.0))


@pytest.mark.parametrize("mask, needle", [
    ({"body": True}, "no entry for the params leaf ['head']['w']"),
    ({"body": True, "head": False, "tail": True}, "entry ['tail'] matches no leaf"),
    ({"body": 1, "head": False}, "one bool per leaf"),
])
def test_bad_masks_are_explained(mask, needle):
  p, x, y = _problem()
  with pytest.raises(ValueError, match=__import__("re").escape(needle)):
    fisher_diagonal(_fn, p, x, y, leaf_mask=mask)
  with pytest.raises(ValueError, match=__import__("re").escape(needle)):
    ewc_loss(p, (Anchor(p, jax.tree.map(np.abs, p)),), lam=1.0, leaf_mask=mask)


def test_traced_mask_is_refused():
  p, _, _ = _problem()
  with pytest.raises(ValueError, match="static bools"):
    jax.jit(lambda m: masks.resolve({"body": m, "head": False}, p))(True)
