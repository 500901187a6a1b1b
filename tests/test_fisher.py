"""Tests for ewc_jax.fisher: every kind against a float64 numpy reference (manual backprop),
the closed-form true Fisher of softmax regression, the Dense fast path against vmap(grad),
masking/padding, the sampled kind, normalisation, huge logits, jit, and argument errors."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewc_jax import fisher as fisher_lib
from ewc_jax.fisher import fisher_diagonal, num_parameters

RTOL = 1e-5


# ----------------------------------------------------------------------------------------------
# Tiny models and a float64 numpy reference.

def _mlp_params(seed=0, d_in=5, d_h=4, d_out=3, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
      "w1": (scale * rng.normal(size=(d_in, d_h)) / np.sqrt(d_in)).astype(np.float32),
      "b1": (0.3 * rng.normal(size=(d_h,))).astype(np.float32),
      "w2": (scale * rng.normal(size=(d_h, d_out)) / np.sqrt(d_h)).astype(np.float32),
      "b2": (0.3 * rng.normal(size=(d_out,))).astype(np.float32),
  }


def mlp_fn(params, x):
  """The 5-4-3 ReLU MLP as a plain function of a params dict."""
  h = jax.nn.relu(jnp.dot(x, params["w1"]) + params["b1"])
  return jnp.dot(h, params["w2"]) + params["b2"]


class FlaxMLP(nn.Module):
  hidden: int = 4
  out: int = 3

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.out)(x)


def _flax_to_dict(variables):
  p = variables["params"]
  return {"w1": p["Dense_0"]["kernel"], "b1": p["Dense_0"]["bias"],
          "w2": p["Dense_1"]["kernel"], "b2": p["Dense_1"]["bias"]}


def _dict_to_flax(d):
  return {"params": {"Dense_0": {"kernel": jnp.asarray(d["w1"]), "bias": jnp.asarray(d["b1"])},
                     "Dense_1": {"kernel": jnp.asarray(d["w2"]), "bias": jnp.asarray(d["b2"])}}}


def _np_forward(p, x):
  pre = x @ p["w1"] + p["b1"]
  h = np.maximum(pre, 0.0)
  z = h @ p["w2"] + p["b2"]
  z = z - z.max()
  prob = np.exp(z) / np.exp(z).sum()
  return pre, h, prob


def _np_grad(p, x, y):
  """Per-example gradient of -log softmax(z)_y by manual backprop (float64)."""
  pre, h, prob = _np_forward(p, x)
  dz = prob.copy()
  dz[y] -= 1.0
  dh = p["w2"] @ dz
  dpre = dh * (pre > 0)
  return {"w1": np.outer(x, dpre), "b1": dpre, "w2": np.outer(h, dz), "b2": dz}


def _np_fisher(p, x, y, kind, batch_size=None):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  acc = {k: np.zeros_like(v) for k, v in p.items()}
  if kind == "batch_squared":
    for start in range(0, n, batch_size):
      idx = range(start, min(start + batch_size, n))
      gs = [_np_grad(p, x[i], y[i]) for i in idx]
      for k in acc:
        acc[k] += len(gs) * np.mean([g[k] for g in gs], axis=0) ** 2
    return {k: v / n for k, v in acc.items()}
  for i in range(n):
    prob = _np_forward(p, x[i])[2]
    if kind == "empirical":
      weighted = [(1.0, y[i])]
    elif kind == "predicted":
      weighted = [(1.0, int(np.argmax(prob)))]
    elif kind == "true":
      weighted = [(prob[c], c) for c in range(prob.shape[0])]
    else:
      raise AssertionError(kind)
    for w, c in weighted:
      g = _np_grad(p, x[i], c)
      for k in acc:
        acc[k] += w * g[k] ** 2
  return {k: v / n for k, v in acc.items()}


def _data(n=10, d_in=5, c=3, seed=1, scale=1.0):
  rng = np.random.default_rng(seed)
  x = (scale * rng.normal(size=(n, d_in))).astype(np.float32)
  y = rng.integers(0, c, size=n).astype(np.int32)
  return x, y


def assert_tree_close(actual, expected, rtol=RTOL, atol_frac=1e-6):
  """Leafwise |a - e| <= rtol |e| + atol_frac * max|e| (atol only for float32 round-off of ~0)."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, (jax.tree_util.keystr(path), a.shape, e.shape)
    atol = atol_frac * max(np.max(np.abs(e)), 1e-30)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


# XLA's optimisation passes dominate the run time of these tiny programs; the maths is the same.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fd(fn, params, inputs, labels=None, *, key=None, mask=None, **static):
  """``fisher_diagonal`` under ``jax.jit`` (cheaper XLA compile); ``static`` are its options."""
  run = jax.jit(lambda p, x, y, k, m: fisher_diagonal(fn, p, x, y, key=k, mask=m, **static),
                compiler_options=_FAST_COMPILE)
  return run(params, inputs, labels, key, mask)


def fd_many(fn, params, inputs, labels, configs, *, key=None):
  """Several ``fisher_diagonal`` calls in one compiled program: ``{name: importance}``.

  ``configs`` maps a name to the keyword options of that call (a ``mask`` is a constant)."""
  run = jax.jit(lambda p, x, y, k: {name: fisher_diagonal(fn, p, x, y, key=k, **kw)
                                    for name, kw in configs.items()},
                compiler_options=_FAST_COMPILE)
  return run(params, inputs, labels, key)


def fd_kinds(fn, params, inputs, labels, kinds, *, key=None, **options):
  """Several kinds with the same options in one compiled program: ``{kind: importance}``."""
  return fd_many(fn, params, inputs, labels, {k: dict(options, kind=k) for k in kinds}, key=key)


# ----------------------------------------------------------------------------------------------
# Every kind against the numpy reference, on the plain function and on the Flax module.

REFERENCE_KINDS = ("empirical", "true", "predicted", "batch_squared")


@functools.lru_cache(maxsize=None)
def _mlp_case(model):
  """(numpy params, fn, params, x, y, {kind: importance as a w1/b1/w2/b2 dict} at batch size 4)."""
  x, y = _data(n=10)
  p = _mlp_params(seed=0)
  if model == "flax":
    params, fn, to_dict = _dict_to_flax(p), FlaxMLP().apply, _flax_to_dict
  else:
    params, fn, to_dict = jax.tree.map(jnp.asarray, p), mlp_fn, lambda d: d
  configs = {k: dict(kind=k, batch_size=4) for k in REFERENCE_KINDS}  # 4 + 4 + a partial 2
  if model == "plain":
    configs.update(
        bsq1=dict(kind="batch_squared", batch_size=1),
        bsq10=dict(kind="batch_squared", batch_size=10),
        norm_bsq=dict(kind="batch_squared", batch_size=4, normalize_by_num_params=True),
        norm_emp=dict(kind="empirical", batch_size=4, normalize_by_num_params=True))
  got = fd_many(fn, params, x, y, configs)
  return p, fn, params, x, y, {k: to_dict(v) for k, v in got.items()}


@pytest.mark.parametrize("model", ["plain", "flax"])
def test_kinds_match_numpy_reference(model):
  p, fn, params, x, y, got = _mlp_case(model)
  # The argmax labels must differ from the true ones somewhere, or "predicted" is not tested.
  assert np.any(np.argmax(np.asarray(fn(params, x)), axis=-1) != y)
  for kind in REFERENCE_KINDS:
    for leaf in jax.tree.leaves(got[kind]):
      assert leaf.dtype == jnp.float32
    assert_tree_close(got[kind], _np_fisher(p, x, y, kind, batch_size=4))


def test_eager_call_matches_numpy_reference():
  """Outside jit, with default compile options (the other tests jit their calls)."""
  x, y = _data(n=7)
  p = _mlp_params(seed=4)
  got = fisher_diagonal(mlp_fn, jax.tree.map(jnp.asarray, p), x, y, batch_size=3)
  assert_tree_close(got, _np_fisher(p, x, y, "empirical"))


def test_empirical_differs_from_batch_squared_and_both_are_right():
  p, fn, params, x, y, got = _mlp_case("plain")
  emp, bsq = got["empirical"], got["batch_squared"]
  assert_tree_close(emp, _np_fisher(p, x, y, "empirical"))
  assert_tree_close(bsq, _np_fisher(p, x, y, "batch_squared", batch_size=4))
  # Mean of squares >= square of means (Jensen), and far from equal here.
  for k in p:
    e, b = np.asarray(emp[k]), np.asarray(bsq[k])
    assert np.all(e >= b * (1 - 1e-5))
    assert np.max(np.abs(e - b)) > 0.05 * np.max(e)
  # batch_squared depends on the batch size: batches of 1 give the empirical Fisher, one batch
  # of N the squared mean gradient.
  assert_tree_close(got["bsq1"], emp)
  full = got["bsq10"]
  assert_tree_close(full, _np_fisher(p, x, y, "batch_squared", batch_size=10))
  assert not np.allclose(np.asarray(full["w1"]), np.asarray(bsq["w1"]), rtol=1e-3)


# ----------------------------------------------------------------------------------------------
# Closed form: the true Fisher of softmax regression.

def test_true_fisher_softmax_regression_closed_form():
  """dℓ(x,k)/dz = p − e_k, so E_k~p (dℓ/dW_ic)² = x_i² E_k (p_c − δ_kc)² = x_i² p_c (1 − p_c)."""
  rng = np.random.default_rng(3)
  n, d, c = 12, 4, 5
  x = rng.normal(size=(n, d)).astype(np.float32)
  params = {"W": (0.7 * rng.normal(size=(d, c))).astype(np.float32),
            "b": (0.5 * rng.normal(size=(c,))).astype(np.float32)}
  fn = lambda p, xb: xb @ p["W"] + p["b"]  # noqa: E731
  z = x.astype(np.float64) @ params["W"] + params["b"]
  prob = np.exp(z - z.max(1, keepdims=True))
  prob /= prob.sum(1, keepdims=True)
  v = prob * (1 - prob)                                   # [n, c]
  want = {"W": np.mean(x.astype(np.float64)[:, :, None] ** 2 * v[:, None, :], axis=0),
          "b": np.mean(v, axis=0)}
  got = fd_many(fn, jax.tree.map(jnp.asarray, params), x, None,
                {m: dict(kind="true", batch_size=5, method=m) for m in ("auto", "vmap")})
  for method in got:
    assert_tree_close(got[method], want)


# ----------------------------------------------------------------------------------------------
# method="auto" (Dense fast path) == method="vmap", on models with and without Dense sites.

class SharedKernel(nn.Module):
  """A 4x4 kernel used twice (weight sharing) between two distinct Dense layers."""

  @nn.compact
  def __call__(self, x):
    w = self.param("shared", nn.initializers.normal(0.6), (4, 4))
    h = nn.relu(nn.Dense(4)(x))
    h = nn.relu(h @ w)
    h = nn.relu(h @ w + self.param("b", nn.initializers.normal(0.3), (4,)))
    return nn.Dense(3)(h)


class TinyConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], 4, 4, 1)
    x = nn.relu(nn.Conv(2, (3, 3))(x))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3)(x)


def _transposed_fn(p, x):
  h = jax.nn.relu(x @ p["wt"].T + p["b1"])   # W stored [out, in]: a transpose, then the dot
  # A square kernel stored [out, in] that dot_general contracts on its *second* axis directly:
  # the outer product a^T δ has the right shape but is the transpose of its gradient.
  h = jax.nn.relu(jnp.einsum("bi,oi->bo", h, p["we"]) + p["be"])
  return jnp.dot(h, p["w2"]) + p["b2"]


def _tokens_fn(p, x):
  """Each example is 2 tokens of 3 features; one kernel is applied to both tokens, so its
  per-example gradient is a sum of two outer products (not a Dense site)."""
  t = x.reshape(-1, 3)                                  # [2B, 3]
  h = jax.nn.relu(t @ p["wt"] + p["bt"]).reshape(x.shape[0], -1)   # [B, 8]
  return h @ p["w2"] + p["b2"]


def _np_init(module, x, seed, scale=0.7):
  """Random numpy variables for ``module`` (shapes from ``eval_shape``: no eager initialisers)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.normal(size=s.shape)).astype(np.float32), shapes)


def _model_zoo(name):
  """(fn, params, inputs, paths of the leaves that must take the Dense fast path)."""
  x5, _ = _data(n=7, d_in=5)
  if name == "flax_mlp":
    return (FlaxMLP().apply, _dict_to_flax(_mlp_params(1)), x5,
            {"['params']['Dense_0']['kernel']", "['params']['Dense_1']['kernel']"})
  if name == "plain_mlp":
    return mlp_fn, jax.tree.map(jnp.asarray, _mlp_params(2)), x5, {"['w1']", "['w2']"}
  if name == "shared_kernel":
    m = SharedKernel()
    return (m.apply, _np_init(m, x5[:1], 2), x5,
            {"['params']['Dense_0']['kernel']", "['params']['Dense_1']['kernel']"})
  if name == "conv":
    x16, _ = _data(n=7, d_in=16)
    m = TinyConv()
    return m.apply, _np_init(m, x16[:1], 3), x16, {"['params']['Dense_0']['kernel']",
                                                   "['params']['Conv_0']['kernel']"}
  rng = np.random.default_rng(7)
  if name == "tokens":
    x6, _ = _data(n=7, d_in=6)
    tp = {"wt": rng.normal(size=(3, 4)).astype(np.float32), "bt": np.zeros(4, np.float32),
          "w2": rng.normal(size=(8, 3)).astype(np.float32), "b2": np.zeros(3, np.float32)}
    return _tokens_fn, jax.tree.map(jnp.asarray, tp), x6, {"['w2']", "['wt']"}
  tp = {"wt": rng.normal(size=(4, 5)).astype(np.float32), "b1": np.zeros(4, np.float32),
        "we": rng.normal(size=(4, 4)).astype(np.float32), "be": np.full(4, 0.5, np.float32),
        "w2": rng.normal(size=(4, 3)).astype(np.float32), "b2": np.zeros(3, np.float32)}
  return _transposed_fn, jax.tree.map(jnp.asarray, tp), x5, {"['w2']"}


def _fast_path_leaves(fn, params, x):
  """Paths of the leaves that take a fast path, from the public plan."""
  return {leaf.path for leaf in fisher_lib.fisher_plan(fn, params, x) if leaf.method != "vmap"}


@pytest.mark.parametrize(
    "name", ["flax_mlp", "plain_mlp", "shared_kernel", "conv", "transposed", "tokens"])
def test_auto_equals_vmap(name):
  fn, params, x, fast = _model_zoo(name)
  # Every leaf takes a fast path (shared kernels: "tied"; transposed kernels: "dense" through the
  # transpose), so the comparison with method="vmap" tests both code paths.
  assert fast <= _fast_path_leaves(fn, params, x) == {l.path for l in fisher_lib.fisher_plan(
      fn, params, x)}
  y = np.random.default_rng(5).integers(0, 3, size=x.shape[0]).astype(np.int32)
  # batch_squared never uses per-example gradients: the method cannot change it. The kinds differ
  # only in the labels and weights they feed the per-example part ("empirical": mixed labels,
  # "true": every class with weights p_c), so the label-picking kinds are run on the MLPs only.
  kinds = ("empirical", "true")
  if name in ("flax_mlp", "plain_mlp"):
    kinds += ("predicted", "sampled")
  got = fd_many(fn, params, x, y, {(k, m): dict(kind=k, batch_size=3, method=m)
                                   for k in kinds for m in ("auto", "vmap")},
                key=jax.random.key(11))
  for kind in kinds:
    for leaf in jax.tree.leaves(got[kind, "vmap"]):
      assert np.all(np.isfinite(leaf)) and np.max(np.abs(leaf)) > 0
    assert_tree_close(got[kind, "auto"], got[kind, "vmap"], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Mask and padding.

def test_mask_ignores_and_does_not_count_rows():
  """Masked rows hold garbage (huge values, NaN, inf, other labels) and must change nothing."""
  x, y = _data(n=12)
  params = jax.tree.map(jnp.asarray, _mlp_params(seed=0))
  mask = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1], bool)
  gx, gy = x.copy(), y.copy()
  gx[~mask] = 1e3 * np.random.default_rng(9).normal(size=gx[~mask].shape)
  gx[1, 2], gx[8, 0] = np.nan, np.inf
  gy[~mask] = 2
  kinds = ("empirical", "true", "predicted", "batch_squared")
  # batch_squared only matches the subset when batches hold the same examples: one batch here.
  want = {k: _np_fisher(_mlp_params(seed=0), x[mask], y[mask], k, batch_size=12) for k in kinds}
  configs = {k: dict(kind=k, batch_size=12, mask=mask) for k in kinds}
  configs.update({f"empirical_bs{bs}": dict(batch_size=bs, mask=mask) for bs in (1, 20)})
  configs["float_mask"] = dict(batch_size=5, mask=mask.astype(np.float32))  # 0/1 floats
  got = fd_many(mlp_fn, params, gx, gy, configs)
  for name, kw in configs.items():
    assert_tree_close(got[name], want[kw.get("kind", "empirical")])


def test_padding_does_not_change_any_kind():
  _, fn, params, x, y, unpadded = _mlp_case("plain")
  pad = 6   # 10 -> 16 rows, a multiple of the batch size 4
  xp = np.concatenate([x, np.random.default_rng(2).normal(size=(pad, 5)).astype(np.float32)])
  yp = np.concatenate([y, np.ones(pad, np.int32)])
  got = fd_kinds(fn, params, xp, yp, REFERENCE_KINDS, batch_size=4, mask=np.arange(16) < 10)
  for kind in REFERENCE_KINDS:
    assert_tree_close(got[kind], unpadded[kind])


def test_internal_padding_is_harmless_for_a_model_undefined_at_zero():
  """N = 10 with batches of 4 pads 2 rows internally; x / |x| has a NaN gradient at x = 0."""
  x, y = _data(n=10)
  params = jax.tree.map(jnp.asarray, _mlp_params(seed=0))
  fn = lambda p, xb: mlp_fn(p, xb / jnp.linalg.norm(xb, axis=-1, keepdims=True))  # noqa: E731
  got = fd_kinds(fn, params, x, y, ("empirical", "batch_squared"), batch_size=4)
  xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
  for kind in got:
    assert_tree_close(got[kind], _np_fisher(_mlp_params(seed=0), xn, y, kind, batch_size=4))


# ----------------------------------------------------------------------------------------------
# Sampled labels.

def test_sampled_is_deterministic_per_key_and_unbiased_for_true():
  x, _ = _data(n=6)
  params = jax.tree.map(jnp.asarray, _mlp_params(seed=0, scale=0.5))  # p not peaked
  sampled = jax.jit(lambda k: fisher_diagonal(mlp_fn, params, x, kind="sampled", key=k,
                                              batch_size=4), compiler_options=_FAST_COMPILE)
  a, b, c = sampled(jax.random.key(0)), sampled(jax.random.key(0)), sampled(jax.random.key(1))
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
  assert any(not np.allclose(np.asarray(a[k]), np.asarray(c[k])) for k in a)

  # The mean over keys approaches the exact expectation ("true"), one sample does not.
  keys = jax.random.split(jax.random.key(42), 2000)
  mean = jax.tree.map(lambda v: jnp.mean(v, axis=0), jax.vmap(sampled)(keys))
  true = _np_fisher(_mlp_params(seed=0, scale=0.5), x, None, "true")
  for k in true:
    t = np.asarray(true[k])
    np.testing.assert_allclose(np.asarray(mean[k]), t, rtol=0.1, atol=0.02 * t.max())
  assert max(np.max(np.abs(np.asarray(a[k]) - np.asarray(true[k]))) / np.max(np.asarray(true[k]))
             for k in a) > 0.1


# ----------------------------------------------------------------------------------------------
# Normalisation, huge logits, jit and result structure.

def test_normalize_by_num_params_divides_by_parameter_count():
  _, fn, params, x, y, plain = _mlp_case("plain")
  n_params = 5 * 4 + 4 + 4 * 3 + 3
  assert num_parameters(params) == n_params
  for kind in ("batch_squared", "empirical"):
    norm = plain["norm_bsq" if kind == "batch_squared" else "norm_emp"]
    assert_tree_close(norm, jax.tree.map(lambda v: v / n_params, plain[kind]), rtol=1e-6)


def test_huge_logits_give_finite_results():
  x, y = _data(n=8, scale=100.0)
  params = jax.tree.map(jnp.asarray, _mlp_params(seed=0, scale=30.0))
  assert np.max(np.abs(np.asarray(mlp_fn(params, x)))) > 1e3
  kinds = ("empirical", "true", "sampled", "predicted", "batch_squared")
  configs = {(k, "auto"): dict(kind=k, batch_size=3) for k in kinds}
  configs.update({(k, "vmap"): dict(kind=k, batch_size=3, method="vmap")
                  for k in ("empirical", "true")})
  got = fd_many(mlp_fn, params, x, y, configs, key=jax.random.key(0))
  for name, imp in got.items():
    for leaf in jax.tree.leaves(imp):
      assert np.all(np.isfinite(np.asarray(leaf))), name
  # Saturated softmax: the true Fisher ~ 0, the empirical one is large where labels are wrong.
  for m in ("auto", "vmap"):
    emp, true = np.asarray(got["empirical", m]["w2"]), np.asarray(got["true", m]["w2"])
    assert np.max(emp) > 1e3 * np.max(true)


def test_jit_and_result_structure():
  x, y = _data(n=10)
  p = _mlp_params(seed=0)
  params = {"layer": {"w": jnp.asarray(p["w1"]), "b": jnp.asarray(p["b1"])},
            "out": (jnp.asarray(p["w2"]), jnp.asarray(p["b2"]))}
  def fn(q, xb):
    h = jax.nn.relu(xb @ q["layer"]["w"] + q["layer"]["b"])
    return h @ q["out"][0] + q["out"][1]
  got = jax.jit(lambda q, xs, ys: fisher_diagonal(fn, q, xs, ys, batch_size=4))(params, x, y)
  assert jax.tree.structure(got) == jax.tree.structure(params)
  for g, q in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    assert g.shape == q.shape and g.dtype == jnp.float32
  want = _np_fisher(p, x, y, "empirical")
  assert_tree_close(got, {"layer": {"w": want["w1"], "b": want["b1"]},
                          "out": (want["w2"], want["b2"])})


def test_bfloat16_params_give_float32_importance():
  x, y = _data(n=6)
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.bfloat16), _mlp_params(seed=0))
  got = fd(mlp_fn, params, x.astype(jnp.bfloat16), y, batch_size=4)
  for g in jax.tree.leaves(got):
    assert g.dtype == jnp.float32 and np.all(np.isfinite(g)) and np.max(g) > 0


# ----------------------------------------------------------------------------------------------
# Argument errors.

@pytest.mark.parametrize("kwargs, needle", [
    (dict(kind="fisher"), "kind='fisher'"),
    (dict(method="loop"), "method='loop'"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(batch_size=-1), "batch_size=-1"),
    (dict(batch_size=2.5), "batch_size=2.5"),
    (dict(labels=None), "labels"),
    (dict(labels=None, kind="batch_squared"), "labels"),
    (dict(labels=np.zeros(7, np.int32)), "labels"),
    (dict(labels=np.zeros((10, 1), np.int32)), "labels"),
    (dict(mask=np.ones(9)), "mask"),
    (dict(kind="sampled"), "key"),
])
def test_bad_arguments_raise_value_error(kwargs, needle):
  x, y = _data(n=10)
  params = jax.tree.map(jnp.asarray, _mlp_params(seed=0))
  args = dict(labels=y)
  args.update(kwargs)
  labels = args.pop("labels")
  with pytest.raises(ValueError, match=re.escape(needle)):
    fisher_diagonal(mlp_fn, params, x, labels, **args)
