"""Training and evaluation steps: jitted pure functions, one compiled program for every task.

Shapes never depend on the task: every task's data are padded to one ``[N_max, ...]`` shape with a
count of valid rows, the task index is an int32 array, and the regulariser's memory (e.g. stacked
anchors with zero-importance free slots) has a fixed shape. The train step takes that memory as an
*argument*; :func:`bind_memory` gives the closure over it (anchors change only between tasks, by
building a new closure, never by mutation), without baking them into the program as constants.

The loss of a step is ``loss = loss_cls + loss_reg`` and the step reports ``loss``, ``loss_cls``,
``loss_reg`` and the batch accuracy ``acc``, like the reference's training step.

Model state (BatchNorm's ``batch_stats``, :mod:`ewc_jax.heads`) lives in
:class:`TrainState` beside the parameters: the train step runs the backbone in train mode (batch
statistics; the running averages it returns replace the old ones), :func:`evaluate` in
evaluation mode on the running averages. Dropout draws from ``fold_in(key, step)`` of the chunk's
``key``: the same numbers for the same key and step, so a resumed run repeats them exactly.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ewc_jax import algorithms
from ewc_jax import errors
from ewc_jax import heads

PyTree = Any
METRIC_NAMES = ("loss", "loss_cls", "loss_reg", "acc")
AUGMENT_STREAM = 0x61756720  # fold_in(step key, ·) of the augmentation draws ("aug ")


class TrainState(NamedTuple):
  """``params`` (``{"backbone": ..., "heads": {...}}``), the optimizer's state and the model
  state (the backbone's collections other than ``params``, e.g. ``{"batch_stats": ...}``; ``{}``
  when it has none), which the train step updates and the optimizer never sees."""
  params: PyTree
  opt_state: PyTree
  model_state: PyTree = {}


class TaskData(NamedTuple):
  """Every task's examples padded to one shape.

  Attributes:
    inputs: ``[T, N_max, ...]`` (any dtype; ``preprocess`` turns a batch into model inputs).
    labels: ``[T, N_max]`` int32 labels (within the task, or global for class-incremental).
    counts: ``[T]`` int32 number of valid rows of each task (the first ``counts[t]`` rows).
    task_ids: optional ``[T, N_max]`` int32 task of each example, when a training set mixes
      tasks (joint training); ``None`` means every example of set t belongs to task t.
  """
  inputs: jax.Array
  labels: jax.Array
  counts: jax.Array
  task_ids: jax.Array | None = None


def scale_pixels(x: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1], in the input's shape (``[B, H, W, C]`` images stay
  images for the convolutional backbones; the MLP flattens them itself)."""
  return x.astype(jnp.float32) / 255.0


OPTIMIZERS = ("adam", "sgd")


def make_optimizer(name: str = "adam") -> optax.GradientTransformation:
  """``"adam"`` or ``"sgd"`` (plain SGD: no momentum, no weight decay), with the learning rate
  in the optimizer state (set by :func:`init_train_state`; so sweeps can vmap over it)."""
  if name not in OPTIMIZERS:
    raise errors.SettingError.invalid("optimizer", name, "one of " + ", ".join(OPTIMIZERS))
  return optax.inject_hyperparams(getattr(optax, name))(learning_rate=1e-3)


def init_train_state(tx: optax.GradientTransformation, params: PyTree, lr: Any,
                     model_state: PyTree = None) -> TrainState:
  """A fresh optimizer state with learning rate ``lr`` (at the start, and at each task when
  the optimizer is reset), beside ``params`` and ``model_state`` (kept as they are)."""
  opt_state = tx.init(params)
  # A fresh buffer: the state may be donated to the train step while ``lr`` is still in use.
  opt_state.hyperparams["learning_rate"] = jnp.array(lr, jnp.float32, copy=True)
  return TrainState(params=params, opt_state=opt_state,
                    model_state={} if model_state is None else model_state)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array):
  """Mean cross-entropy and accuracy over the rows with weight 1."""
  count = jnp.maximum(jnp.sum(weights), 1.0)
  xent = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(weights * xent) / count, jnp.sum(weights * correct) / count


def loss_fn(net: heads.Network, algo: algorithms.Algorithm, params: PyTree, x, y, w,
            task_index, memory, hyper, example_tasks=None, *, consolidate: str = "shared",
            model_state: PyTree = None, rng: jax.Array | None = None):
  """``loss_cls + loss_reg`` and ``(loss_cls, loss_reg, acc, model_state)``; the penalty sees the
  consolidated parameters (:func:`ewc_jax.heads.consolidated`: the backbone and every head shared
  by several tasks). The network runs in train mode (:func:`ewc_jax.heads.train_logits`:
  ``model_state`` is the updated one, ``rng`` the dropout key).

  ``example_tasks`` (``[B]``) gives each example's head when a batch mixes tasks; classes
  stay masked as of ``task_index`` (class-incremental).
  """
  ids = task_index if example_tasks is None else example_tasks
  logits, model_state = heads.train_logits(net, params, model_state or {}, x, ids,
                                           seen_through=task_index, rng=rng)
  loss_cls, acc = masked_cross_entropy(logits, y, w)
  theta = heads.consolidated(net, params, consolidate)
  loss_reg = algo.penalty(theta, memory, hyper, task_index).astype(jnp.float32)
  return loss_cls + loss_reg, (loss_cls, loss_reg, acc, model_state)


def train_step(net: heads.Network, algo: algorithms.Algorithm, tx: optax.GradientTransformation,
               state: TrainState, batch, task_index, memory, hyper, *,
               consolidate: str = "shared", rng: jax.Array | None = None):
  """One optimizer step on ``batch = (x, y, w)`` or ``(x, y, w, example_tasks)``.

  ``memory`` is the algorithm's memory of the consolidated subtree
  (``algo.init(heads.consolidated(net, params, consolidate), num_tasks)``); ``rng`` the dropout
  key of this step (``None``: none, for networks without dropout). The model state is replaced
  by the one of the train-mode forward pass (BatchNorm's running averages updated with this
  batch's statistics). Returns ``(state, metrics)``. Pure; jit it with ``net``, ``algo`` and
  ``tx`` static (see :func:`make_train_step`).
  """
  x, y, w = batch[:3]
  example_tasks = batch[3] if len(batch) > 3 else None
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, net, algo, consolidate=consolidate,
                                                 model_state=state.model_state, rng=rng),
                               has_aux=True)
  (loss, (loss_cls, loss_reg, acc, model_state)), grads = grad_fn(
      state.params, x, y, w, task_index, memory, hyper, example_tasks)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "loss_cls": loss_cls, "loss_reg": loss_reg, "acc": acc}
  return TrainState(params, opt_state, model_state), metrics


def make_train_step(net, algo, tx, consolidate: str = "shared") -> Callable:
  """The jitted core ``step(state, batch, task_index, memory, hyper)``."""
  return jax.jit(functools.partial(train_step, net, algo, tx, consolidate=consolidate))


def bind_memory(step: Callable, memory: PyTree, hyper: algorithms.Hyper) -> Callable:
  """``step(state, batch, task_index)`` closing over an (immutable) memory, e.g. anchors.

  The memory is passed to the jitted core as an argument, so a new closure after each task
  reuses the same compiled program.
  """
  return lambda state, batch, task_index: step(state, batch, task_index, memory, hyper)


def epoch_order(key: jax.Array, count: jax.Array, n_max: int, length: int) -> jax.Array:
  """A random order of the first ``count`` of ``n_max`` rows first, padded to ``length``."""
  r = jax.random.uniform(key, (n_max,))
  r = jnp.where(jnp.arange(n_max) < count, r, 2.0)
  order = jnp.argsort(r).astype(jnp.int32)
  return jnp.pad(order, (0, length - n_max))


def train_chunk(net, algo, tx, preprocess, batch_size: int, num_steps: int,
                state: TrainState, data: TaskData, order: jax.Array, start_step,
                task_index, memory, hyper, stop_step=None, key: jax.Array | None = None, *,
                consolidate: str = "shared", augment: Callable | None = None):
  """``num_steps`` steps of one epoch, from batch ``start_step`` of ``order``.

  Batches past the task's data, or from ``stop_step`` on (an epoch cut short when training is
  counted in iterations), are skipped (no optimizer update): the steps that have data are a
  prefix of the chunk, and a ``lax.fori_loop`` runs exactly those (a ``lax.cond`` per step
  inside a ``lax.scan`` cost ~9 % of a step on CPU); the last partial batch is masked. Its
  masked rows are filled with the epoch's first examples (``order`` read cyclically),
  so a BatchNorm backbone computes that batch's statistics on real examples of the task (the
  loss still counts each valid row once; for a stateless backbone the numbers do not depend on
  what the masked rows hold). Step ``s`` draws dropout from ``fold_in(key, s)`` (``key=None``:
  no dropout key) and, with ``augment(key, x)`` (:mod:`ewc_jax.augment`), its batch's
  augmentation from ``fold_in(fold_in(key, s), AUGMENT_STREAM)``. Returns ``(state, metrics)``
  with ``metrics[name]`` of shape ``[num_steps]``, ``metrics["count"]`` the number of examples
  of each step (0 for a skipped step), and ``metrics["params_finite"]`` /
  ``metrics["opt_state_finite"]`` whether the returned state's parameters / optimizer state are
  finite.
  """
  count = data.counts[task_index]
  inputs, labels = data.inputs[task_index], data.labels[task_index]

  def body(state, i):
    step = start_step + i
    pos = step * batch_size + jnp.arange(batch_size)
    valid = pos < count
    idx = order[jnp.where(valid, pos, pos % jnp.maximum(count, 1))]
    if stop_step is not None:
      valid = valid & (step < stop_step)
    w = valid.astype(jnp.float32)
    rng = None if key is None else jax.random.fold_in(key, step)
    x = preprocess(inputs[idx])
    if augment is not None:
      if rng is None:
        raise ValueError("`augment` needs the chunk's `key` (its draws come from it).")
      x = augment(jax.random.fold_in(rng, AUGMENT_STREAM), x)
    batch = (x, labels[idx], w)
    if data.task_ids is not None:
      batch = batch + (data.task_ids[task_index][idx],)
    state, metrics = train_step(net, algo, tx, state, batch, task_index, memory, hyper,
                                consolidate=consolidate, rng=rng)
    return state, dict(metrics, count=jnp.sum(w))

  # Steps with data: start_step + i < min(ceil(count / batch_size), stop_step).
  end = (count + batch_size - 1) // batch_size
  if stop_step is not None:
    end = jnp.minimum(end, stop_step)
  active = jnp.clip(end - start_step, 0, num_steps)

  def loop_body(i, carry):
    state, out = carry
    state, metrics = body(state, i)
    return state, {k: out[k].at[i].set(v.astype(jnp.float32)) for k, v in metrics.items()}

  out = {k: jnp.zeros((num_steps,), jnp.float32) for k in METRIC_NAMES + ("count",)}
  state, out = lax.fori_loop(0, active, loop_body, (state, out))
  # The state's finiteness at the chunk's end: an optimizer state that overflowed (Adam's second
  # moment at inf freezes the parameters while the loss stays finite) is seen at once.
  out["params_finite"] = all_finite(state.params)
  out["opt_state_finite"] = all_finite(state.opt_state)
  return state, out


def all_finite(tree: PyTree) -> jax.Array:
  """Whether every floating-point array of ``tree`` is finite (a scalar bool; True if none)."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def evaluate(net, preprocess, params: PyTree, data: TaskData, trained_task=None,
             model_state: PyTree = None) -> jax.Array:
  """``[T]`` test accuracy on every task after training ``trained_task``, in evaluation mode
  (BatchNorm on the running averages of ``model_state``, dropout off).

  Each task is scored with its own head (task-incremental) or the shared one; class-incremental
  predictions pick among the classes seen by the end of ``trained_task`` (default: all tasks).
  """
  num_tasks = data.inputs.shape[0]
  if trained_task is None:
    trained_task = num_tasks - 1

  def accuracy(t):
    x = preprocess(data.inputs[t])
    lg = heads.logits(net, params, x, t, seen_through=trained_task, model_state=model_state)
    w = (jnp.arange(x.shape[0]) < data.counts[t]).astype(jnp.float32)
    return masked_cross_entropy(lg, data.labels[t], w)[1]

  return lax.map(accuracy, jnp.arange(num_tasks))
