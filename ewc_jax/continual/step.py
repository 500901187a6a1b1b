"""Training and evaluation steps: jitted pure functions, one compiled program for every task.

Shapes never depend on the task: every task's data are padded to one ``[N_max, ...]`` shape with a
count of valid rows, the task index is an int32 array, and the regulariser's memory (e.g. stacked
anchors with zero-importance free slots) has a fixed shape. The train step takes that memory as an
*argument* (anchors change only between tasks, never by mutation), so they are never baked into
the program as constants. What a step is built from is one :class:`Step`; what a chunk reads,
one :class:`ChunkInputs`.

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
from ewc_jax.continual.task_data import TaskData

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


class Step(NamedTuple):
  """What a train step is built from (fixed for a run; closed over, never traced).

  Attributes:
    net: the network (:class:`ewc_jax.heads.Network`).
    algo: the algorithm (:class:`ewc_jax.algorithms.Algorithm`): its penalty is ``loss_reg``.
    tx: the optimizer (:func:`make_optimizer`).
    preprocess: a batch of stored rows -> the backbone's inputs (default :func:`scale_pixels`).
    batch_size: examples per step.
    num_steps: steps per compiled chunk (:func:`train_chunk`).
    consolidate: the parameters the penalty sees (:func:`ewc_jax.heads.consolidated`).
    augment: ``augment(key, x)`` of the training batches (:mod:`ewc_jax.augment`), or None.
  """
  net: heads.Network
  algo: algorithms.Algorithm
  tx: optax.GradientTransformation
  preprocess: Callable = scale_pixels
  batch_size: int = 128
  num_steps: int = 64
  consolidate: str = "shared"
  augment: Callable | None = None


class Batch(NamedTuple):
  """A training batch: inputs ``x``, labels ``y``, row weights ``w`` (1: a real row, 0: padding)
  and, when a batch mixes tasks, each row's task ``example_tasks`` (``[B]``)."""
  x: jax.Array
  y: jax.Array
  w: jax.Array
  example_tasks: jax.Array | None = None


class ChunkInputs(NamedTuple):
  """What :func:`train_chunk` reads besides the train state (in a sweep, the fields with a
  config axis are those of :data:`CHUNK_AXES` marked 0).

  Attributes:
    data: every task's padded training data (:class:`TaskData`).
    order: the epoch's order of the rows (:func:`epoch_order`).
    start_step: the chunk's first step within the epoch (int32).
    task_index: the task being trained (int32).
    memory: the algorithm's memory of the consolidated parameters.
    hyper: the numeric hyperparameters (:class:`ewc_jax.algorithms.Hyper`).
    stop_step: the epoch's end when cut short (training counted in iterations), or None.
    key: the epoch's dropout / augmentation key, or None (no dropout, no augmentation).
  """
  data: TaskData
  order: jax.Array
  start_step: Any
  task_index: Any
  memory: PyTree
  hyper: algorithms.Hyper
  stop_step: Any = None
  key: jax.Array | None = None


# The sweep's config axis of each input: 0 (one value per config) or None (shared).
CHUNK_AXES = ChunkInputs(data=None, order=0, start_step=None, task_index=None, memory=0, hyper=0,
                         stop_step=None, key=0)


def loss_fn(spec: Step, params: PyTree, batch: Batch, *, task_index, memory, hyper,
            model_state: PyTree = None, rng: jax.Array | None = None):
  """``loss_cls + loss_reg`` and ``(loss_cls, loss_reg, acc, model_state)``; the penalty sees the
  consolidated parameters (:func:`ewc_jax.heads.consolidated`: the backbone and every head shared
  by several tasks). The network runs in train mode (:func:`ewc_jax.heads.train_logits`:
  ``model_state`` is the updated one, ``rng`` the dropout key).

  ``batch.example_tasks`` (``[B]``) gives each example's head when a batch mixes tasks; classes
  stay masked as of ``task_index`` (class-incremental).
  """
  ids = task_index if batch.example_tasks is None else batch.example_tasks
  logits, model_state = heads.train_logits(spec.net, params, model_state or {}, batch.x, ids,
                                           seen_through=task_index, rng=rng)
  loss_cls, acc = masked_cross_entropy(logits, batch.y, batch.w)
  theta = heads.consolidated(spec.net, params, spec.consolidate)
  loss_reg = spec.algo.penalty(theta, memory, hyper, task_index).astype(jnp.float32)
  return loss_cls + loss_reg, (loss_cls, loss_reg, acc, model_state)


def train_step(spec: Step, state: TrainState, batch: Batch, *, task_index, memory, hyper,
               rng: jax.Array | None = None):
  """One optimizer step on ``batch``.

  ``memory`` is the algorithm's memory of the consolidated subtree
  (``spec.algo.init(heads.consolidated(spec.net, params, spec.consolidate), num_tasks)``): an
  argument, so one compiled program serves every task (anchors change only between tasks, by
  passing a new memory, never by mutation, and are never baked into the program as constants);
  ``rng`` the dropout key of this step (``None``: none, for networks without dropout). The model
  state is replaced by the one of the train-mode forward pass (BatchNorm's running averages
  updated with this batch's statistics). Returns ``(state, metrics)``. Pure; jit it with
  ``spec`` closed over, e.g. ``jax.jit(functools.partial(train_step, spec))``.
  """
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, spec, model_state=state.model_state,
                                                 rng=rng, task_index=task_index,
                                                 memory=memory, hyper=hyper), has_aux=True)
  (loss, (loss_cls, loss_reg, acc, model_state)), grads = grad_fn(state.params, batch)
  updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "loss_cls": loss_cls, "loss_reg": loss_reg, "acc": acc}
  return TrainState(params, opt_state, model_state), metrics


def epoch_order(key: jax.Array, count: jax.Array, n_max: int, length: int) -> jax.Array:
  """A random order of the first ``count`` of ``n_max`` rows first, padded to ``length``."""
  r = jax.random.uniform(key, (n_max,))
  r = jnp.where(jnp.arange(n_max) < count, r, 2.0)
  order = jnp.argsort(r).astype(jnp.int32)
  return jnp.pad(order, (0, length - n_max))


def train_chunk(spec: Step, state: TrainState, inputs: ChunkInputs):
  """``spec.num_steps`` steps of one epoch, from batch ``inputs.start_step`` of ``inputs.order``.

  Batches past the task's data, or from ``stop_step`` on (an epoch cut short when training is
  counted in iterations), are skipped (no optimizer update): the steps that have data are a
  prefix of the chunk, and a ``lax.fori_loop`` runs exactly those (no ``lax.cond`` per step);
  the last partial batch is masked. Its
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
  data, order, start_step, task_index, memory, hyper, stop_step, key = inputs
  batch_size, num_steps, preprocess, augment = (spec.batch_size, spec.num_steps, spec.preprocess,
                                                spec.augment)
  count = data.counts[task_index]
  rows, labels = data.inputs[task_index], data.labels[task_index]

  def body(state, i):
    step = start_step + i
    pos = step * batch_size + jnp.arange(batch_size)
    valid = pos < count
    idx = order[jnp.where(valid, pos, pos % jnp.maximum(count, 1))]
    if stop_step is not None:
      valid = valid & (step < stop_step)
    w = valid.astype(jnp.float32)
    rng = None if key is None else jax.random.fold_in(key, step)
    x = preprocess(rows[idx])
    if augment is not None:
      if rng is None:
        raise ValueError("`augment` needs the chunk's `key` (its draws come from it).")
      x = augment(jax.random.fold_in(rng, AUGMENT_STREAM), x)
    tasks = None if data.task_ids is None else data.task_ids[task_index][idx]
    state, metrics = train_step(spec, state, Batch(x, labels[idx], w, tasks),
                                task_index=task_index, memory=memory, hyper=hyper, rng=rng)
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
