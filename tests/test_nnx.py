"""Flax NNX (finding 1 of issue 14): anchors never alias the model's live Variables, and an NNX
``State`` works in fisher_diagonal, ewc_loss, stack_anchors, save/restore_anchors and the optax
transform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ewc_jax
from ewc_jax import Anchor, ewc_loss, fisher_diagonal


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def _data(n=32, seed=1):
  x = jax.random.normal(jax.random.key(seed), (n, 4))
  return x, jnp.argmax(x[:, :3], axis=-1)


def _train(model, anchors, lam, x, y, steps=5):
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, anchors):
    def loss_fn(model):
      ce = optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
      return ce + ewc_loss(nnx.state(model, nnx.Param), anchors, lam=lam)
    _, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)

  for _ in range(steps):
    step(model, optimizer, anchors)


@pytest.mark.parametrize("how", ["split", "state"])
def test_anchor_from_live_state_stays_frozen_while_the_model_trains(how):
  model = MLP(nnx.Rngs(0))
  x, y = _data()
  if how == "split":
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    logits_fn = lambda p, xb: nnx.merge(graphdef, p, rest)(xb)  # noqa: E731
  else:
    params = nnx.state(model)          # this model holds Params only
    graphdef = nnx.graphdef(model)
    logits_fn = lambda p, xb: nnx.merge(graphdef, p)(xb)  # noqa: E731
  before = jax.tree.map(np.array, jax.tree.leaves(params))
  importance = fisher_diagonal(logits_fn, params, x, y, batch_size=8)
  anchor = Anchor(params=params, importance=importance)       # params: the live Variables
  # The anchor holds arrays, not the model's Variables.
  assert not any(isinstance(v, nnx.Variable) for v in jax.tree.leaves(
      anchor, is_leaf=lambda v: isinstance(v, nnx.Variable)))
  _train(model, (anchor,), 1.0, x, y)
  after = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert not np.allclose(after[0], before[0])                 # the model moved ...
  for a, b in zip(jax.tree.leaves(anchor.params), before):    # ... the anchor did not
    np.testing.assert_array_equal(a, b)
  # So the penalty is positive now (on the old code it was exactly 0 at every step).
  assert float(ewc_loss(nnx.state(model, nnx.Param), (anchor,), lam=1.0)) > 0


def test_nnx_fisher_equals_linen_style_dict_fisher_and_penalty_gradient():
  model = MLP(nnx.Rngs(3))
  x, y = _data(seed=4)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  got = fisher_diagonal(lambda p, xb: nnx.merge(graphdef, p, rest)(xb), params, x, y,
                        batch_size=8)
  assert isinstance(got, nnx.State)
  pure = nnx.to_pure_dict(params)
  def dict_fn(p, xb):
    h = jax.nn.relu(xb @ p["l1"]["kernel"] + p["l1"]["bias"])
    return h @ p["l2"]["kernel"] + p["l2"]["bias"]
  want = fisher_diagonal(dict_fn, pure, x, y, batch_size=8, method="vmap")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
  # The plan names NNX leaves by their State path; kernels take the Dense fast path.
  plan = {leaf.path: leaf.method for leaf in ewc_jax.fisher_plan(
      lambda p, xb: nnx.merge(graphdef, p, rest)(xb), params, x)}
  assert plan["['l1']['kernel']"] == "dense" and plan["['l2']['kernel']"] == "dense"
  # ewc_loss on an NNX State equals ewc_loss on the same numbers as dicts; anchors of either form.
  anchor = Anchor(params=params, importance=got)
  moved = jax.tree.map(lambda v: v + 0.1, pure)
  moved_state = nnx.State(moved)
  v_dict = ewc_loss(moved, [Anchor(pure, want)], lam=2.0)
  for anchors in ([anchor], [Anchor(pure, want)], ewc_jax.stack_anchors([anchor, anchor])):
    scale = 2.0 if not isinstance(anchors, list) else 1.0
    np.testing.assert_allclose(float(ewc_loss(moved_state, anchors, lam=2.0)),
                               scale * float(v_dict), rtol=1e-5)


def test_nnx_anchors_save_and_restore(tmp_path):
  model = MLP(nnx.Rngs(5))
  x, y = _data(seed=6)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  imp = fisher_diagonal(lambda p, xb: nnx.merge(graphdef, p, rest)(xb), params, x, y)
  anchors = (Anchor(params, imp),)
  ewc_jax.save_anchors(tmp_path / "seq", anchors)
  ewc_jax.save_anchors(tmp_path / "stacked", ewc_jax.stack_anchors(anchors))
  back = ewc_jax.restore_anchors(tmp_path / "seq", like=anchors)
  assert isinstance(back[0].params, nnx.State)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(anchors)):
    np.testing.assert_array_equal(a, b)
  plain = ewc_jax.restore_anchors(tmp_path / "seq")             # nested dicts
  stacked = ewc_jax.restore_anchors(tmp_path / "stacked")
  q = nnx.state(model, nnx.Param)
  want = float(ewc_loss(jax.tree.map(lambda v: v + 1.0, q), anchors, lam=1.0))
  for other in (plain, stacked):
    np.testing.assert_allclose(
        float(ewc_loss(jax.tree.map(lambda v: v + 1.0, q), other, lam=1.0)), want, rtol=1e-6)


def test_nnx_optax_transform_equals_penalty_gradient():
  model = MLP(nnx.Rngs(7))
  x, y = _data(seed=8)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  imp = fisher_diagonal(lambda p, xb: nnx.merge(graphdef, p, rest)(xb), params, x, y)
  anchors = (Anchor(params, imp),)
  moved = jax.tree.map(lambda v: v + 0.3, nnx.state(model, nnx.Param))
  tx = ewc_jax.add_ewc_gradient(anchors, lam=3.0)
  zeros = jax.tree.map(jnp.zeros_like, nnx.to_pure_dict(params))
  got, _ = tx.update(nnx.State(zeros), tx.init(params), moved)
  want = jax.grad(lambda p: ewc_loss(p, anchors, lam=3.0))(nnx.to_pure_dict(moved))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


class DropoutMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(nnx.relu(self.l1(x))))


def test_whole_state_with_rng_keys_is_refused_with_the_fix():
  model = DropoutMLP(nnx.Rngs(0))
  model.eval()
  x, y = _data()
  graphdef, state = nnx.split(model)
  with pytest.raises(ValueError, match=r"nnx\.state\(model, nnx\.Param\)"):
    fisher_diagonal(lambda s, xb: nnx.merge(graphdef, s)(xb), state, x, y)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  f = fisher_diagonal(lambda p, xb: nnx.merge(graphdef, p, rest)(xb), params, x, y)
  again = fisher_diagonal(lambda p, xb: nnx.merge(graphdef, p, rest)(xb), params, x, y)
  for a, b in zip(jax.tree.leaves(f), jax.tree.leaves(again)):   # eval(): dropout off
    np.testing.assert_array_equal(a, b)


def test_nnx_optimizer_with_the_optax_transform_trains_and_pulls_to_the_anchor():
  model = MLP(nnx.Rngs(9))
  x, y = _data(seed=10)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  imp = fisher_diagonal(lambda p, xb: nnx.merge(graphdef, p, rest)(xb), params, x, y)
  anchors = (Anchor(params, jax.tree.map(lambda v: v + 1.0, imp)),)
  start = [np.array(v) for v in jax.tree.leaves(anchors[0].params)]
  def run(tx):
    m = MLP(nnx.Rngs(9))
    opt = nnx.Optimizer(m, tx, wrt=nnx.Param)
    x_b, y_b = _data(seed=11)
    @nnx.jit
    def step(m, opt):
      grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(
          m(x_b), y_b).mean())(m)
      opt.update(m, grads)
    for _ in range(20):
      step(m, opt)
    return sum(float(np.sum((np.asarray(a) - b) ** 2))
               for a, b in zip(jax.tree.leaves(nnx.state(m, nnx.Param)), start))
  free = run(optax.sgd(0.1))
  held = run(optax.chain(ewc_jax.add_ewc_gradient(anchors, lam=5.0), optax.sgd(0.1)))
  assert held < 0.5 * free


def test_merged_statistics_accept_nnx_state():
  model = MLP(nnx.Rngs(12))
  x, y = _data(seed=13)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  imp = fisher_diagonal(lambda p, xb: nnx.merge(graphdef, p, rest)(xb), params, x, y)
  anchor = Anchor(params, imp)
  merged = ewc_jax.merge_anchor(ewc_jax.empty_merged(params), anchor)
  moved = jax.tree.map(lambda v: v + 0.2, nnx.state(model, nnx.Param))
  np.testing.assert_allclose(float(ewc_jax.merged_distance(moved, merged)),
                             float(ewc_loss(moved, (anchor,), lam=2.0)), rtol=1e-5)


class NnxCNN(nnx.Module):
  """The CNN of Flax's NNX MNIST tutorial, narrowed."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(4, 6, kernel_size=(3, 3), rngs=rngs)
    self.linear = nnx.Linear(6 * 3 * 3, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.avg_pool(nnx.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
    return self.linear(x.reshape(x.shape[0], -1))


def test_nnx_cnn_takes_the_conv_fast_path_and_equals_vmap_grad():
  model = NnxCNN(nnx.Rngs(14))
  x = jax.random.normal(jax.random.key(15), (10, 12, 12, 1))
  y = jnp.arange(10) % 3
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fn = lambda p, xb: nnx.merge(graphdef, p, rest)(xb)  # noqa: E731
  plan = {leaf.path: leaf.method for leaf in ewc_jax.fisher_plan(fn, params, x)}
  assert plan["['conv1']['kernel']"] == plan["['conv2']['kernel']"] == "conv"
  fast = fisher_diagonal(fn, params, x, y, batch_size=4)
  slow = fisher_diagonal(fn, params, x, y, batch_size=4, method="vmap")
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6 * float(np.max(b)))
