import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ewc_jax import algorithms, heads
from ewc_jax.continual import step as step_lib
from ewc_jax.continual import task_data

D = 12


@pytest.fixture(scope="module")
def setup():
  net = heads.task_incremental(num_tasks=3, classes_per_task=2, hidden=(16,))
  params = heads.init_params(net, jax.random.key(0), jnp.ones((1, D)))
  tx = step_lib.make_optimizer()
  return net, params, tx


def _jitted_step(net, algo, tx):
  """``step(state, (x, y, w), task_index, memory, hyper)``: the train step, jitted, the memory
  an argument (one program for every task)."""
  spec = step_lib.Step(net, algo, tx)
  return jax.jit(lambda state, batch, task_index, memory, hyper: step_lib.train_step(
      spec, state, step_lib.Batch(*batch), task_index=task_index, memory=memory, hyper=hyper))


def _batch(n, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (n, D)), jax.random.randint(k2, (n,), 0, 2), jnp.ones((n,))


def _ewc_memory(params, algo, net=None):
  theta = {"backbone": params["backbone"]} if net is None else heads.consolidated(net, params)
  memory = algo.init(theta, 3)
  imp = jax.tree.map(lambda x: jnp.full(x.shape, 0.5), theta)
  ref = jax.tree.map(lambda x: x + 0.1, theta)
  return algo.consolidate(memory, ref, imp, 0, algorithms.Hyper())


def test_step_reports_loss_parts_and_accuracy(setup):
  net, params, tx = setup
  algo = algorithms.ewc(p=2.0)
  memory = _ewc_memory(params, algo)
  hyper = algorithms.Hyper(lam=jnp.float32(3.0))
  state = step_lib.init_train_state(tx, params, 1e-3)
  x, y, w = _batch(8)
  step = _jitted_step(net, algo, tx)
  new_state, m = step(state, (x, y, w), jnp.int32(1), memory, hyper)
  assert set(m) == {"loss", "loss_cls", "loss_reg", "acc"}
  logits = heads.logits(net, params, x, 1)
  np.testing.assert_allclose(
      m["loss_cls"], optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["acc"], np.mean(np.argmax(logits, -1) == y), rtol=1e-6)
  # loss_reg = (lam/2) * sum F (theta - theta*)^2 = 1.5 * 0.5 * 0.01 * num_params
  n = sum(x.size for x in jax.tree.leaves(params["backbone"]))
  np.testing.assert_allclose(m["loss_reg"], 1.5 * 0.5 * 0.01 * n, rtol=1e-4)
  np.testing.assert_allclose(m["loss"], m["loss_cls"] + m["loss_reg"], rtol=1e-6)
  # Only the trained task's head and the backbone move.
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new_state.params)
  assert moved["heads"]["task_2"]["kernel"] and not moved["heads"]["task_1"]["kernel"]
  assert moved["backbone"]["Dense_0"]["kernel"]


def test_bound_step_reuses_one_program_for_new_anchors(setup):
  net, params, tx = setup
  algo = algorithms.ewc(p=2.0)
  core = _jitted_step(net, algo, tx)
  state = step_lib.init_train_state(tx, params, 1e-3)
  hyper = algorithms.Hyper(lam=jnp.float32(1.0))
  batch = _batch(8)
  memory = algo.init(heads.consolidated(net, params), 3)
  losses = []
  for t in range(3):
    state, m = core(state, batch, jnp.int32(t), memory, hyper)  # a new memory, never mutation
    losses.append(float(m["loss_reg"]))
    memory = _ewc_memory(state.params, algo)
  assert core._cache_size() == 1
  assert losses[0] == 0.0 and losses[1] > 0


def test_masked_partial_batch_equals_unpadded_batch(setup):
  net, params, tx = setup
  algo = algorithms.finetune()
  x, y, _ = _batch(5, seed=3)
  state = step_lib.init_train_state(tx, params, 1e-3)
  spec = step_lib.Step(net, algo, tx)
  ref_state, ref_m = step_lib.train_step(spec, state, step_lib.Batch(x, y, jnp.ones(5)),
                                         task_index=0, memory=(), hyper=algorithms.Hyper())
  xp = jnp.concatenate([x, 100 * jnp.ones((3, D))])
  yp = jnp.concatenate([y, jnp.ones(3, jnp.int32)])
  w = jnp.array([1.0] * 5 + [0.0] * 3)
  state = step_lib.init_train_state(tx, params, 1e-3)
  pad_state, pad_m = step_lib.train_step(spec, state, step_lib.Batch(xp, yp, w), task_index=0,
                                         memory=(), hyper=algorithms.Hyper())
  for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(pad_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ref_m["loss"], pad_m["loss"], rtol=1e-6)


def test_epoch_order_puts_valid_rows_first():
  order = np.asarray(step_lib.epoch_order(jax.random.key(0), jnp.int32(7), 10, 16))
  assert sorted(order[:7]) == list(range(7))
  assert sorted(order[7:10]) == [7, 8, 9]
  assert len(order) == 16
  other = np.asarray(step_lib.epoch_order(jax.random.key(1), jnp.int32(7), 10, 16))
  assert not np.array_equal(order[:7], other[:7])


def test_chunk_skips_steps_past_the_data(setup):
  net, params, tx = setup
  algo = algorithms.finetune()
  n_max, bs = 10, 4
  x = jax.random.randint(jax.random.key(0), (2, n_max, D), 0, 255).astype(jnp.uint8)
  data = task_data.TaskData(x, jnp.zeros((2, n_max), jnp.int32), jnp.array([6, 10], jnp.int32))
  order = step_lib.epoch_order(jax.random.key(0), data.counts[0], n_max, 12)
  chunk = functools.partial(step_lib.train_chunk, step_lib.Step(net, algo, tx, batch_size=bs,
                                                                num_steps=3))
  state = step_lib.init_train_state(tx, params, 1e-3)
  state, m = jax.jit(chunk)(state, step_lib.ChunkInputs(
      data=data, order=order, start_step=jnp.int32(0), task_index=jnp.int32(0), memory=(),
      hyper=algorithms.Hyper()))
  np.testing.assert_array_equal(m["count"], [4, 2, 0])  # 6 examples: 4 + a partial 2 + skip
  assert int(state.opt_state.count if hasattr(state.opt_state, "count")
             else state.opt_state.inner_state[0].count) == 2


def test_evaluate_uses_each_tasks_head(setup):
  net, params, _ = setup
  x = jax.random.randint(jax.random.key(5), (3, 7, D), 0, 255).astype(jnp.uint8)
  preds = jnp.stack([jnp.argmax(heads.logits(net, params, step_lib.scale_pixels(x[t]), t), -1)
                     for t in range(3)])
  data = task_data.TaskData(x, preds.astype(jnp.int32), jnp.array([7, 3, 5], jnp.int32))
  np.testing.assert_allclose(step_lib.evaluate(net, step_lib.scale_pixels, params, data), [1, 1, 1])
  flipped = data._replace(labels=1 - data.labels)
  np.testing.assert_allclose(step_lib.evaluate(net, step_lib.scale_pixels, params, flipped), [0, 0, 0])


# ------------------------------------------------------------------------------------------------
# The optimizer choice (Config.optimizer, --optimizer).

@pytest.mark.parametrize("name", step_lib.OPTIMIZERS)
def test_optimizer_state_keeps_the_lr_and_has_the_choices_structure(setup, name):
  net, params, _ = setup
  tx = step_lib.make_optimizer(name)
  state = step_lib.init_train_state(tx, params, 0.05)
  assert float(state.opt_state.hyperparams["learning_rate"]) == pytest.approx(0.05)
  inner = state.opt_state.inner_state
  moments = [leaf for leaf in jax.tree.leaves(inner) if leaf.shape]  # per-parameter buffers
  if name == "adam":  # mu and nu: two buffers per parameter
    assert len(moments) == 2 * len(jax.tree.leaves(params))
  else:  # plain SGD keeps no per-parameter state
    assert moments == []


def test_sgd_step_is_minus_lr_times_the_gradient_and_lowers_the_loss(setup):
  net, params, _ = setup
  algo = algorithms.finetune()
  memory = ()
  tx = step_lib.make_optimizer("sgd")
  lr = 0.1
  state = step_lib.init_train_state(tx, params, lr)
  x, y, w = _batch(64)
  grads = jax.grad(lambda p: step_lib.loss_fn(
      step_lib.Step(net, algo, tx), p, step_lib.Batch(x, y, w), task_index=jnp.int32(0),
      memory=memory, hyper=algorithms.Hyper())[0])(params)
  step = _jitted_step(net, algo, tx)
  new, m0 = step(state, (x, y, w), jnp.int32(0), memory, algorithms.Hyper())
  jax.tree.map(lambda a, g, b: np.testing.assert_allclose(b, a - lr * g, rtol=1e-5, atol=1e-7),
               params, grads, new.params)
  losses = [float(m0["loss"])]
  for _ in range(20):
    new, m = step(new, (x, y, w), jnp.int32(0), memory, algorithms.Hyper())
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.85 * losses[0]  # 0.83 -> 0.66 (deterministic)


def test_unknown_optimizer_is_refused():
  with pytest.raises(ValueError, match=r"`optimizer`='rmsprop' is invalid: expected one of "
                                       "adam, sgd"):
    step_lib.make_optimizer("rmsprop")


class _Standardise(nn.Module):
  """BatchNorm alone; momentum 0: the running mean is the last batch's mean."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.BatchNorm(use_running_average=not train, momentum=0.0)(x)


def test_last_partial_batch_normalises_with_real_examples_only():
  """6 valid rows (all ones) of 10 (the padding rows are zeros), batches of 4: the partial second
  batch is filled with the epoch's first examples, so its BatchNorm mean is exactly 1."""
  net = heads.task_incremental(1, 2, backbone=_Standardise())
  x = jnp.concatenate([jnp.ones((6, 3)), jnp.zeros((4, 3))])[None]
  data = task_data.TaskData(x, jnp.zeros((1, 10), jnp.int32), jnp.array([6], jnp.int32))
  params, model_state = heads.init_variables(net, jax.random.key(0), x[0, :1])
  tx = step_lib.make_optimizer("sgd")
  state = step_lib.init_train_state(tx, params, 0.0, model_state)
  order = step_lib.epoch_order(jax.random.key(1), data.counts[0], 10, 12)
  chunk = jax.jit(functools.partial(step_lib.train_chunk, step_lib.Step(
      net, algorithms.finetune(), tx, preprocess=lambda b: b, batch_size=4, num_steps=2)))
  state, m = chunk(state, step_lib.ChunkInputs(
      data=data, order=order, start_step=jnp.int32(0), task_index=jnp.int32(0), memory=(),
      hyper=algorithms.Hyper()))
  np.testing.assert_array_equal(m["count"], [4, 2])
  np.testing.assert_array_equal(state.model_state["batch_stats"]["BatchNorm_0"]["mean"],
                                np.ones(3))
