"""Token-level Fisher (``[B, T, C]`` logits, ``label_mask``) for every kind, ``fisher_from_nll`` for a
Gaussian regression and a categorical policy, ``fisher_from_batches`` == ``fisher_diagonal`` on
the concatenation (uneven batches, ``max_examples``), and the accumulator inside a user's ``jit``;
each against brute-force per-row loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ewc_jax import fisher_accumulator, fisher_diagonal, fisher_from_batches, fisher_from_nll

N, T, D, C = 7, 4, 3, 5


def _close(a_tree, b_tree, rtol=2e-5):
  for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= rtol * max(np.max(np.abs(b)), 1e-30), np.max(np.abs(a - b))


def _seq_model():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(D, C)), jnp.float32),
            "mix": jnp.asarray(0.5 * rng.normal(size=(T, T)), jnp.float32),
            "b": jnp.asarray(0.3 * rng.normal(size=(C,)), jnp.float32)}
  def logits_fn(p, x):                                  # x [B, T, D] -> [B, T, C], mixes tokens
    h = jnp.tanh(jnp.einsum("st,btd->bsd", p["mix"], x))
    return h @ p["w"] + p["b"]
  x = jnp.asarray(rng.normal(size=(N, T, D)), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, (N, T)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, (N, T)), jnp.float32).at[:, 0].set(1.0)
  return logits_fn, params, x, y, mask


def _row_grad(logits_fn, params, x, labels, weights):
  """∇ Σ_t weights_t · CE(logits_t, labels_t) of one row."""
  def loss(p):
    lg = logits_fn(p, x[None])[0]
    return jnp.sum(weights * optax.softmax_cross_entropy_with_integer_labels(lg, labels))
  return jax.grad(loss)(params)


def _brute(kind, reduction="sum", key=None):
  fn, p, x, y, m = _seq_model()
  total = jax.tree.map(jnp.zeros_like, p)
  logits = fn(p, x)
  probs = jax.nn.softmax(logits, -1)
  if kind == "sampled":
    y = jax.random.categorical(jax.random.fold_in(key, 0), logits).astype(jnp.int32)
  if kind == "predicted":
    y = jnp.argmax(logits, -1).astype(jnp.int32)
  for n in range(N):
    scale = 1.0 if reduction == "sum" else 1.0 / float(jnp.sum(m[n]))
    if kind == "true":
      for t in range(T):
        for c in range(C):
          w = scale * m[n] * (jnp.arange(T) == t)
          g = _row_grad(fn, p, x[n], jnp.full((T,), c), w)
          total = jax.tree.map(lambda a, b, q=probs[n, t, c]: a + q * b * b, total, g)
    else:
      g = _row_grad(fn, p, x[n], y[n], scale * m[n])
      total = jax.tree.map(lambda a, b: a + b * b, total, g)
  if kind == "batch_squared":
    def mean_loss(q):
      ce = optax.softmax_cross_entropy_with_integer_labels(fn(q, x), y)
      return jnp.mean(jnp.sum(m * ce, axis=1))
    g = jax.grad(mean_loss)(p)
    return jax.tree.map(lambda a: a * a, g)        # N (∂L)² / N with one batch of N
  return jax.tree.map(lambda a: a / N, total)


@pytest.mark.parametrize("kind", ["empirical", "true", "sampled", "predicted", "batch_squared"])
def test_sequence_fisher_with_padding_matches_brute_force(kind):
  fn, p, x, y, m = _seq_model()
  key = jax.random.key(3)
  got = fisher_diagonal(fn, p, x, y, m, kind=kind, batch_size=N, key=key)
  _close(got, _brute(kind, key=key))


def test_sequence_fisher_mean_reduction():
  fn, p, x, y, m = _seq_model()
  _close(fisher_diagonal(fn, p, x, y, m, reduction="mean", batch_size=3),
         _brute("empirical", "mean"))


def test_padding_positions_do_not_count():
  fn, p, x, y, m = _seq_model()
  garbage = jnp.where(m > 0, y, (y + 1) % C)
  _close(fisher_diagonal(fn, p, x, garbage, m), fisher_diagonal(fn, p, x, y, m))


def test_fisher_from_nll_gaussian_regression():
  rng = np.random.default_rng(1)
  p = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "s": jnp.zeros(2)}
  def nll(q, b):              # heteroscedastic Gaussian: mean x·w, log-std s
    r = (b["y"] - b["x"] @ q["w"]) * jnp.exp(-q["s"])
    return jnp.sum(0.5 * r * r + q["s"], axis=-1)
  data = {"x": jnp.asarray(rng.normal(size=(9, 3)), jnp.float32),
          "y": jnp.asarray(rng.normal(size=(9, 2)), jnp.float32)}
  batches = [jax.tree.map(lambda a, i=i: a[i:i + 4], data) for i in range(0, 9, 4)]
  got = fisher_from_nll(nll, p, batches)
  per_row = jax.vmap(jax.grad(lambda q, b: nll(q, jax.tree.map(lambda a: a[None], b))[0]),
                     in_axes=(None, 0))(p, data)
  _close(got, jax.tree.map(lambda g: jnp.mean(g * g, axis=0), per_row))


def test_fisher_from_nll_policy_sampled_converges_to_the_true_fisher():
  rng = np.random.default_rng(2)
  p = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
  states = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  def nll(q, b):
    return optax.softmax_cross_entropy_with_integer_labels(b["s"] @ q["w"], b["a"])
  def sample(q, b, key):
    return {"s": b["s"], "a": jax.random.categorical(key, b["s"] @ q["w"]).astype(jnp.int32)}
  batch = {"s": states, "a": jnp.zeros(6, jnp.int32)}
  got = fisher_from_nll(nll, p, [batch], sample_fn=sample, key=jax.random.key(0),
                        num_samples=400)
  exact = fisher_diagonal(lambda q, s: s @ q["w"], p, states, kind="true")
  np.testing.assert_allclose(got["w"], exact["w"], rtol=0.15, atol=0.02 * float(exact["w"].max()))
  # sample_fn's draws are what the empirical Fisher of those actions gives:
  fixed = lambda q, b, key: {"s": b["s"], "a": jnp.argmax(b["s"] @ q["w"], -1)}  # noqa: E731
  _close(fisher_from_nll(nll, p, [batch], sample_fn=fixed, key=jax.random.key(0)),
         fisher_diagonal(lambda q, s: s @ q["w"], p, states, kind="predicted"))


def test_fisher_from_batches_equals_fisher_diagonal_on_the_concatenation():
  fn, p, x, y, m = _seq_model()
  batches = [(x[i:i + 3], y[i:i + 3], m[i:i + 3]) for i in range(0, N, 3)]   # 3, 3, 1 rows
  _close(fisher_from_batches(fn, p, batches), fisher_diagonal(fn, p, x, y, m))
  _close(fisher_from_batches(fn, p, iter(batches), max_examples=5),
         fisher_diagonal(fn, p, x[:5], y[:5], m[:5]))
  numpy_batches = ((np.asarray(a), np.asarray(b)) for a, b, _ in batches)   # a generator
  _close(fisher_from_batches(fn, p, numpy_batches), fisher_diagonal(fn, p, x, y))


def test_accumulator_inside_a_users_jit():
  fn, p, x, y, m = _seq_model()
  acc = fisher_accumulator(fn)

  @jax.jit
  def loop(params, xs, ys, ms):
    def body(state, batch):
      return acc.update(state, params, *batch), None
    state, _ = jax.lax.scan(body, acc.init(params),
                            (xs.reshape(N, 1, T, D), ys.reshape(N, 1, T), ms.reshape(N, 1, T)))
    return acc.result(state)
  _close(loop(p, x, y, m), fisher_diagonal(fn, p, x, y, m))


def test_fisher_from_nll_sequence_equals_token_level_fisher_diagonal():
  fn, p, x, y, m = _seq_model()
  def nll(q, b):              # a row's summed token loss over its unmasked positions
    ce = optax.softmax_cross_entropy_with_integer_labels(fn(q, b["x"]), b["y"])
    return jnp.sum(b["m"] * ce, axis=-1)
  batches = [{"x": x[i:i + 4], "y": y[i:i + 4], "m": m[i:i + 4]} for i in range(0, N, 4)]
  _close(fisher_from_nll(nll, p, batches), fisher_diagonal(fn, p, x, y, m))
