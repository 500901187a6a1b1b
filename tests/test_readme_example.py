"""The README's library examples run as written: linen, NNX, BatchNorm + dropout + leaf masks,
and the optax transformation (each in a Flax + optax loop)."""

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

README = Path(__file__).resolve().parents[1] / "README.md"


def _library_blocks():
  text = README.read_text()
  start = text.index("## The library")
  section = text[start:text.index("\n## ", start + 1)]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def _run(code, scope):
  exec(compile(code, str(README), "exec"), scope)  # pylint: disable=exec-used
  return scope


def _task(seed=1, n=32):
  x = jax.random.normal(jax.random.key(seed), (n, 4))
  return x, jnp.argmax(x[:, :3], axis=-1)


def test_library_section_has_the_four_examples():
  blocks = _library_blocks()
  assert len(blocks) == 4
  assert "model.apply" in blocks[0] and "nnx.split" in blocks[1]
  assert "batch_stats" in blocks[2] and "leaf_mask" in blocks[2]
  assert "add_ewc_gradient" in blocks[3]


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def _linen_scope():
  model = Model()
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  x_a, y_a = _task()
  return {"model": model, "params": params, "tx": optax.adam(1e-2), "x_a": x_a, "y_a": y_a}


def test_readme_library_example_runs():
  scope = _run(_library_blocks()[0], _linen_scope())
  params, tx, x_a, y_a = scope["params"], scope["tx"], scope["x_a"], scope["y_a"]
  opt_state = tx.init(params)
  p = params
  for _ in range(3):
    p, opt_state, loss = scope["train_step"](p, opt_state, x_a, y_a, scope["anchors"])
  assert np.isfinite(float(loss))
  assert not np.allclose(jax.tree.leaves(p)[0], jax.tree.leaves(params)[0])


class NnxModel(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def test_readme_nnx_example_runs_and_the_anchor_stays_frozen():
  model = NnxModel(nnx.Rngs(0))
  x_a, y_a = _task()
  scope = _run(_library_blocks()[1], {"model": model, "x_a": x_a, "y_a": y_a})
  frozen = [np.array(v) for v in jax.tree.leaves(scope["anchors"][0].params)]
  x_b, y_b = _task(seed=2)
  for _ in range(3):
    loss = scope["train_step"](model, scope["optimizer"], x_b, y_b, scope["anchors"])
  assert np.isfinite(float(loss))
  now = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert not np.allclose(now[0], frozen[0])
  for a, b in zip(jax.tree.leaves(scope["anchors"][0].params), frozen):
    np.testing.assert_array_equal(a, b)


class BNModel(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(3, name="head")(x)


def test_readme_batchnorm_example_runs_consolidates_params_and_updates_running_stats():
  model = BNModel()
  x_a, y_a = _task()
  variables = model.init(jax.random.key(0), x_a[:2], train=False)
  tx = optax.adam(1e-2)
  scope = _run(_library_blocks()[2], {"model": model, "variables": variables, "tx": tx,
                                      "x_a": x_a, "y_a": y_a})
  F = scope["F"]
  # What is consolidated: the shared params (BatchNorm's scale and bias too), not the head.
  assert set(F) == {"Dense_0", "BatchNorm_0", "head"}
  assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(F["head"]))
  assert all(np.max(np.asarray(v)) > 0 for v in jax.tree.leaves(F["BatchNorm_0"]))
  # Evaluation mode: deterministic (dropout off) and on the running statistics.
  again = scope["fisher_diagonal"](scope["eval_logits"], variables["params"], x_a, y_a,
                                   leaf_mask=scope["shared"])
  for a, b in zip(jax.tree.leaves(F), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  x_b, y_b = _task(seed=2)
  p, stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
  for i in range(3):
    p, stats, opt_state, loss = scope["train_step"](p, stats, opt_state, x_b, y_b,
                                                    scope["anchors"], jax.random.key(i))
  assert np.isfinite(float(loss))
  # The running statistics are not parameters: training on the new task keeps updating them.
  assert not np.allclose(stats["BatchNorm_0"]["mean"], variables["batch_stats"]["BatchNorm_0"]["mean"])
  # The penalty covers the shared params only (the head moves freely at no cost).
  moved = jax.tree.map(lambda v: v, variables["params"])
  moved = {**moved, "head": jax.tree.map(lambda v: v + 1.0, moved["head"])}
  assert float(scope["ewc_loss"](moved, scope["anchors"], lam=1.0, leaf_mask=scope["shared"])) == 0


def test_readme_optax_transform_example_runs_and_pulls_towards_the_anchor():
  scope = _linen_scope()
  _run(_library_blocks()[0], scope)                       # defines logits_fn and anchors
  x_b, y_b = _task(seed=2)
  params0 = scope["params"]
  scope.update({"x_b": x_b, "y_b": y_b})
  _run(_library_blocks()[3], scope)
  assert jax.tree.structure(scope["params"]) == jax.tree.structure(params0)
  # Its gradient part equals the gradient of task loss + ewc_loss (the README's λ).
  from ewc_jax import ewc_loss  # pylint: disable=import-outside-toplevel
  moved = jax.tree.map(lambda v: v + 0.05, params0)
  task_loss = scope["task_loss"]
  add = scope["add_ewc_gradient"](scope["anchors"], lam=1000.0)
  got, _ = add.update(jax.grad(task_loss)(moved), add.init(moved), moved)
  want = jax.grad(lambda p: task_loss(p) + ewc_loss(p, scope["anchors"], lam=1000.0))(moved)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert max(float(np.max(np.abs(b))) for b in jax.tree.leaves(want)) > 1e-3
