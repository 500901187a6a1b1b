"""ewc_jax.fisher_program: an eager warm fisher_diagonal call compiles nothing (also with a new lambda
closing over new arrays, whose values it does see), another setting compiles once, and the
streaming forms reuse one program for a padded last batch."""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import fisher_diagonal, fisher_from_batches


class _BNConv(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


@contextlib.contextmanager
def _compiles():
  events = []
  def listener(name, secs, **_):
    del secs
    if "backend_compile" in name:
      events.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _setup():
  m = _BNConv()
  v = m.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, 6, 6, 1)).astype(np.float32)
  y = (np.arange(10) % 3).astype(np.int32)
  return m, v, x, y


def _close(a, b):
  for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-7 * float(np.max(np.abs(w))))


def test_warm_eager_call_compiles_nothing_and_sees_new_closed_over_values():
  m, v, x, y = _setup()
  def call(stats, batch_size=4, **kw):   # a new lambda on every call, closing over the stats
    return fisher_diagonal(lambda p, xb: m.apply({"params": p, "batch_stats": stats}, xb),
                           v["params"], x, y, batch_size=batch_size, **kw)
  first = call(v["batch_stats"])
  moved = jax.tree.map(lambda a: a + 0.5, v["batch_stats"])
  with _compiles() as events:
    again = call(v["batch_stats"])
    other = call(moved)
  assert events == []
  _close(again, first)
  assert not np.allclose(other["Dense_0"]["kernel"], first["Dense_0"]["kernel"])
  _close(other, call(moved, method="vmap"))
  with _compiles() as events:
    call(v["batch_stats"], batch_size=5)
  assert len(events) >= 1          # another setting: its own program


def test_streaming_pads_the_last_batch_into_the_same_program():
  m, v, x, y = _setup()
  fn = lambda p, xb: m.apply({"params": p, "batch_stats": v["batch_stats"]}, xb)  # noqa: E731
  batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 10, 4)]               # 4, 4, 2 rows
  fisher_from_batches(fn, v["params"], batches)
  with _compiles() as events:
    got = fisher_from_batches(fn, v["params"], batches)
  assert events == []
  _close(got, fisher_diagonal(fn, v["params"], x, y))


def test_jitted_call_still_works_and_equals_eager():
  m, v, x, y = _setup()
  fn = lambda p, xb: m.apply({"params": p, "batch_stats": v["batch_stats"]}, xb)  # noqa: E731
  jitted = jax.jit(lambda p, s: fisher_diagonal(
      lambda q, xb: m.apply({"params": q, "batch_stats": s}, xb), p, x, y, batch_size=4))
  _close(jitted(v["params"], v["batch_stats"]), fisher_diagonal(fn, v["params"], x, y,
                                                               batch_size=4))
