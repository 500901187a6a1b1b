"""The continual-learning protocol: train task after task, evaluate, consolidate.

:func:`run` is the one loop every benchmark shares. It compiles each piece once, ahead of time
(epoch order, a chunk of train steps, evaluation of every task, consolidation = Fisher + memory
update), so the compile time is measured on its own and no task triggers a recompile: task data
are padded to one shape and the task index is an array.

Any backbone (``Config.backbone``, or your own Flax linen module: :mod:`ewc_jax.backbones`) runs
through the same programs. Its model state (BatchNorm's ``batch_stats``) is part of the train
state: updated by every train step (train mode, batch statistics), read by evaluation and the
Fisher (evaluation mode, running averages), saved in checkpoints, vmapped and sharded in sweeps
like the parameters. It is one copy shared by every task: the running averages keep following
the newest task's data, for the old tasks too, and EWC (which consolidates parameters only) does
not hold them. Dropout keys: step s of epoch e of task t draws from
``fold_in(fold_in(fold_in(k_dropout, t), e), s)`` with ``k_dropout = fold_in(k_order,
DROPOUT_STREAM)`` (``k_order`` is otherwise only folded with task indices), so a resumed run
draws the same masks.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import algorithms
from ewc_jax import augment as augment_lib
from ewc_jax import backbones
from ewc_jax import errors
from ewc_jax import executable_cache
from ewc_jax import fisher as fisher_lib
from ewc_jax import heads
from ewc_jax import holdout
from ewc_jax import initializers
from ewc_jax import subset
from ewc_jax import task_data
from ewc_jax import train as train_lib

PyTree = Any

ALGOS = algorithms.NAMES
PENALTIES = algorithms.PENALTIES
BACKBONES = backbones.NAMES
DROPOUT_STREAM = 0x64726F70  # fold_in(k_order, ·) of the dropout keys ("drop"; never a task index)
SUBSET_STREAM = 0x73756273  # fold_in(Fisher key, ·) of the fisher_examples rows ("subs")


def _setting(default: Any, help_text: str) -> Any:
  """A :class:`Config` field with its description (``metadata["help"]``: command lines generate
  their flags, and their help, from the fields)."""
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class Config:
  """Plain-data configuration of one continual-learning run (defaults: the peers' protocol).

  Each field's ``metadata["help"]`` says what it means (the experiment command lines turn every
  field into a flag of the same name, e.g. ``lam`` -> ``--lam``).
  """
  algo: str = _setting("ewc", f"Algorithm: {'|'.join(algorithms.NAMES)}.")
  scenario: str = _setting(
      "task", "task (a head per task, task id known) | domain (one shared head) | class (one "
      "head over all classes seen so far).")
  penalty: str = _setting(
      "standard", "EWC penalty (with algo=ewc): standard = (lam/2)*sum F|theta-theta*|^p "
      "(Kirkpatrick 2017); seed = the seed reference's per-tensor p-norm / task id; clarena = "
      "CLArena 1.1.0's 0.5*lam*sum F (theta-theta*)^2.")
  lam: float = _setting(
      1000.0, "Regularisation strength lambda (> 0). Convention: the loss adds (lam/2) * "
      "sum_k sum_i F_ki |theta_i - theta*_ki|^p, with F the mean per-example Fisher (no "
      "1/num_params).")
  p: float = _setting(2.0, "Exponent p of |theta - theta*| (> 0).")
  gamma: float = _setting(1.0, "Online EWC decay of the accumulated importance, (0, 1].")
  fisher: str = _setting("empirical", f"Importance estimator: {'|'.join(fisher_lib.KINDS)}.")
  fisher_batch_size: int = _setting(
      256, "Examples per Fisher scan step (changes the result only for batch_squared).")
  fisher_normalize: bool = _setting(
      False, "Divide the importance by the number of backbone parameters (seed parity).")
  fisher_examples: int | None = _setting(
      None, "Estimate each task's Fisher on N of its training examples, drawn at random "
      "without replacement from the run's Fisher key (ewc_jax.subset; van de Ven 2025's "
      "EXACT(n=500) is fisher=true with 500); default: all of them.")
  consolidate: str | None = _setting(
      None, "What EWC consolidates (ewc_jax.heads.consolidated): shared (the backbone and "
      "every head used by more than one task: domain-IL's shared head, class-IL's single head; "
      "task-IL's per-task heads stay free) | backbone | all. Default: shared, or backbone for "
      "penalty=seed|clarena (the reference's behaviour).")
  epochs: int | None = _setting(
      2, "Training length per task in epochs (>= 1); exclusive with steps_per_task.")
  steps_per_task: int | None = _setting(
      None, "Training length per task in iterations (>= 1; van de Ven & Tolias count "
      "iterations); exclusive with epochs.")
  reset_optimizer: bool = _setting(
      True, "Restart the optimizer at every task (as CLArena and Avalanche); false keeps its "
      "state across tasks (as Hsu et al. 2018 and van de Ven & Tolias 2019).")
  optimizer: str = _setting(
      "adam", "adam | sgd (plain SGD, no momentum: Avalanche's baseline); lr is its learning "
      "rate.")
  batch_size: int = _setting(128, "Training batch size (>= 1).")
  lr: float = _setting(1e-3, "Learning rate of the optimizer (> 0).")
  seed: int = _setting(
      0, "PRNG seed: initialisation, shuffling, permutations, sampled labels.")
  hidden: tuple[int, ...] = _setting((400, 400), "Layer widths of the mlp backbone.")
  backbone: str = _setting(
      "mlp", f"The shared network (ewc_jax.backbones): {'|'.join(backbones.NAMES)} (mlp: hidden "
      "widths; cnn: flax/examples/mnist's CNN; resnet18: the reduced ResNet-18 of GEM / Mammoth "
      "/ Avalanche, width 20, BatchNorm; resnet18_full: width 64).")
  width: int | None = _setting(
      None, "ResNet width (channels of stage 1); default: the backbone's own (20, or 64 for "
      "resnet18_full).")
  init: str = _setting(
      "flax", "Parameter initialisation (ewc_jax.initializers): flax (LeCun-normal kernels, zero "
      "biases) | pytorch (PyTorch's nn.Linear/nn.Conv2d default: kernels and biases uniform in "
      "±1/sqrt(fan_in)), for parity with papers' PyTorch code.")
  augment: str = _setting(
      "none", "Training-batch augmentation (ewc_jax.augment), drawn on device from the run's "
      "key: none | crop_flip (random crop after 4 pixels of zero padding, horizontal flip: the "
      "CIFAR convention). Needs image inputs [B, H, W, C]; evaluation and Fisher see the images "
      "as they are.")
  validation_fraction: float = _setting(
      0.0, "Hold out this fraction of each task's training data as a validation split, scored "
      "like the test set (val_acc_matrix), in [0, 1); 0: none. The held-out rows depend on "
      "validation_seed only (ewc_jax.holdout).")
  validation_seed: int = _setting(
      0, "Which rows the validation split holds out (the same for every seed and sweep config).")
  chunk_steps: int = _setting(
      64, "Train steps per compiled chunk (a lax.fori_loop): progress, checkpoints and the NaN "
      "check act between chunks. Does not change the results.")

  @property
  def consolidated(self) -> str:
    """The consolidated set in force (``consolidate`` with its default resolved)."""
    if self.consolidate is not None:
      return self.consolidate
    return "backbone" if self.penalty in ("seed", "clarena") else "shared"

  def schedule(self, count: int) -> tuple[int, int, int]:
    """``(epochs, steps per epoch, steps of the last epoch)`` of a task of ``count`` examples:
    with ``steps_per_task`` S, the task runs ceil(S / steps) epochs, the last one cut short."""
    steps = -(-int(count) // self.batch_size)
    if self.steps_per_task is None:
      return self.epochs, steps, steps
    epochs = -(-self.steps_per_task // steps)
    return epochs, steps, self.steps_per_task - (epochs - 1) * steps

  def validate(self) -> None:
    """Raises ``ValueError`` naming the first bad field (flag), its value and what is allowed."""
    def bad(name, value, allowed):
      raise errors.SettingError.invalid(name, value, allowed)
    if self.algo not in ALGOS:
      bad("algo", self.algo, "one of " + ", ".join(ALGOS))
    if self.scenario not in heads.SCENARIOS:
      bad("scenario", self.scenario, "one of " + ", ".join(heads.SCENARIOS))
    if self.penalty not in PENALTIES:
      bad("penalty", self.penalty, "one of " + ", ".join(PENALTIES))
    if self.penalty != "standard" and self.algo != "ewc":
      penalty = self.penalty
      raise errors.SettingError(lambda n: f"{n('penalty')}={penalty!r} is invalid: expected "
                                f"standard unless {n('algo')}=ewc.")
    if self.algo == "ewc_merged" and self.p != 2:
      p = self.p
      raise errors.SettingError(lambda n: f"{n('p')}={p!r} is invalid: expected 2 with "
                                f"{n('algo')}=ewc_merged (a merged quadratic).")
    if not (0 < self.gamma <= 1):
      bad("gamma", self.gamma, "a number in (0, 1]")
    if self.consolidate is not None and self.consolidate not in heads.CONSOLIDATE:
      bad("consolidate", self.consolidate, "one of " + ", ".join(heads.CONSOLIDATE))
    if self.fisher not in fisher_lib.KINDS:
      bad("fisher", self.fisher, "one of " + ", ".join(fisher_lib.KINDS))
    if not np.isfinite(self.lam) or self.lam <= 0:
      bad("lam", self.lam, "a finite number > 0")
    if not np.isfinite(self.p) or self.p <= 0:
      bad("p", self.p, "a finite number > 0")
    if not np.isfinite(self.lr) or self.lr <= 0:
      bad("lr", self.lr, "a finite number > 0")
    if (self.epochs is None) == (self.steps_per_task is None):
      epochs, steps = self.epochs, self.steps_per_task
      raise errors.SettingError(lambda n: (
          f"{n('epochs')}={epochs!r} and {n('steps_per_task')}={steps!r} are invalid together: "
          "expected exactly one of them (training length per task in epochs or in iterations)."))
    for name in ("epochs", "steps_per_task", "batch_size", "fisher_batch_size", "chunk_steps",
                 "fisher_examples"):
      value = getattr(self, name)
      if value is None and name in ("epochs", "steps_per_task", "fisher_examples"):
        continue
      if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        bad(name, value, "an integer >= 1")
    if self.optimizer not in train_lib.OPTIMIZERS:
      bad("optimizer", self.optimizer, "one of " + ", ".join(train_lib.OPTIMIZERS))
    if self.init not in initializers.NAMES:
      bad("init", self.init, "one of " + ", ".join(initializers.NAMES))
    if self.augment not in augment_lib.NAMES:
      bad("augment", self.augment, "one of " + ", ".join(augment_lib.NAMES))
    if not isinstance(self.reset_optimizer, (bool, np.bool_)):
      bad("reset_optimizer", self.reset_optimizer, "true or false")
    if not (np.isfinite(self.validation_fraction) and 0 <= self.validation_fraction < 1):
      bad("validation_fraction", self.validation_fraction, "a number in [0, 1) (0: none)")
    if not self.hidden or any(h < 1 for h in self.hidden):
      bad("hidden", self.hidden, "positive layer widths")
    if self.backbone not in BACKBONES:
      bad("backbone", self.backbone, "one of " + ", ".join(BACKBONES))
    if self.width is not None:
      with_width = [n for n in BACKBONES if "width" in backbones.options(n)]
      if self.backbone not in with_width:
        backbone = self.backbone
        raise errors.SettingError(lambda n: (
            f"{n('width')}={self.width!r} is invalid with {n('backbone')}={backbone!r}: expected "
            f"no width (None) unless the backbone is one of {', '.join(with_width)}."))
      if (isinstance(self.width, bool) or not isinstance(self.width, (int, np.integer))
          or self.width < 1):
        bad("width", self.width, "an integer >= 1 (or None: the backbone's default)")


def make_network(cfg: Config, class_groups: Sequence[Sequence[int]], **options) -> heads.Network:
  """The network ``cfg`` describes (scenario, backbone, hidden/width) for tasks made of
  ``class_groups``; ``options`` go to the backbone (e.g. ``input_shape=(28, 28, 1)`` for
  images stored flat). See :func:`ewc_jax.heads.make_network`."""
  if cfg.width is not None:
    options = {"width": int(cfg.width), **options}
  return heads.make_network(cfg.scenario, class_groups, cfg.hidden, backbone=cfg.backbone,
                            **options)


class NumericalError(ArithmeticError):
  """The training loss became NaN or infinite: the run stops before that state is kept.

  Attributes (0-based): ``task``, ``epoch``, ``step`` (within the epoch), ``task_step`` (within
  the task), ``part`` (``"cls"``, ``"reg"``, ``"cls and reg"``, or ``"sum"`` when only their
  sum overflows), ``value`` (the bad loss value) and ``config`` (sweep index, or None).
  """

  def __init__(self, message: str | Callable[..., str], *, task: int, epoch: int, step: int,
               task_step: int, part: str, value: float, config: int | None = None):
    # message: text, or ``render(name)`` naming settings (see ewc_jax.errors.SettingError)
    self.render = message if callable(message) else (lambda name: message)
    super().__init__(self.render(errors.as_field))
    self.task, self.epoch, self.step, self.task_step = task, epoch, step, task_step
    self.part, self.value, self.config = part, value, config

  def for_flags(self) -> str:
    """The message with the settings spelled as flags (``--lr``)."""
    return self.render(errors.as_flag)


def check_finite(metrics: dict, *, task: int, num_tasks: int, epoch: int, start: int,
                 steps: int) -> None:
  """Raises :class:`NumericalError` at the first step of a chunk whose loss is not finite, or
  at the chunk's end when its parameters or optimizer state are not (``metrics`` of
  :func:`ewc_jax.train.train_chunk`, with a leading config axis in a sweep)."""
  parts = [np.asarray(metrics[k]) for k in ("loss_cls", "loss_reg", "loss")]
  bad = [~np.isfinite(a) for a in parts]
  any_bad = bad[0] | bad[1] | bad[2]
  if not np.any(any_bad):
    _check_state_finite(metrics, task=task, num_tasks=num_tasks, epoch=epoch, start=start,
                        steps=steps)
    return
  config, i = (None, int(np.argmax(any_bad))) if any_bad.ndim == 1 else (
      tuple(int(v) for v in np.argwhere(any_bad.T)[0][::-1]))
  at = (i,) if config is None else (config, i)
  cls_bad, reg_bad = bool(bad[0][at]), bool(bad[1][at])
  part = ("cls and reg" if cls_bad and reg_bad else "cls" if cls_bad else "reg" if reg_bad
          else "sum")
  value = float(parts[0 if cls_bad else 1 if reg_bad else 2][at])
  name = {"cls": "loss_cls", "reg": "loss_reg", "cls and reg": "loss_cls and loss_reg",
          "sum": "loss_cls + loss_reg"}[part]
  step = start + i
  where = f" of sweep config {config}" if config is not None else ""
  text = (f"the training loss became {value} at task {task + 1}/{num_tasks}, epoch {epoch + 1}, "
          f"step {step + 1}/{steps}{where}: {name} {'are' if ' and ' in part else 'is'} not "
          f"finite (the {part} part of the loss). Stopped before keeping that state")
  raise NumericalError(
      lambda n: f"{text}; try a smaller {n('lr')} or {n('lam')}.",
      task=task, epoch=epoch, step=step, task_step=epoch * steps + step, part=part,
      value=value, config=config)


def _check_state_finite(metrics: dict, *, task: int, num_tasks: int, epoch: int, start: int,
                        steps: int) -> None:
  """The state part of :func:`check_finite`: the parameters, then the optimizer state."""
  for key, part in (("params_finite", "parameters"), ("opt_state_finite", "optimizer state")):
    if key not in metrics:
      continue
    bad = ~np.asarray(metrics[key], bool)
    if not np.any(bad):
      continue
    config = None if bad.ndim == 0 else int(np.argmax(bad))
    done = np.asarray(metrics["count"]) > 0
    active = int(done.sum(-1) if config is None else done[config].sum(-1))
    last = start + max(active, 1)
    where = f" of sweep config {config}" if config is not None else ""
    text = (f"the {part} became non-finite at task {task + 1}/{num_tasks}, epoch {epoch + 1}, "
            f"steps {start + 1}-{last}/{steps}{where}, while the training loss stayed finite "
            "(e.g. the optimizer's second moment overflowed). Stopped before keeping that state")
    raise NumericalError(
        lambda n, text=text: f"{text}; try a smaller {n('lr')} or {n('lam')}.",
        task=task, epoch=epoch, step=last - 1, task_step=epoch * steps + last - 1, part=part,
        value=float("nan"), config=config)


def divergence_record(err: NumericalError) -> dict:
  """A sweep config's divergence as plain data (saved in checkpoints, returned in results)."""
  return {"task": err.task, "epoch": err.epoch, "step": err.step, "part": err.part,
          "value": err.value, "message": str(err), "flags_message": err.for_flags()}


def new_divergences(metrics: dict, diverged: dict, *, task: int, num_tasks: int, epoch: int,
                    start: int, steps: int) -> dict[int, NumericalError]:
  """Sweeps: ``{config: NumericalError}`` of the configs of a chunk's ``metrics`` (leading
  config axis) that diverged in it, those already in ``diverged`` left out."""
  out = {}
  for k in range(int(np.asarray(metrics["loss"]).shape[0])):
    if k in diverged:
      continue
    try:
      check_finite({name: np.asarray(v)[k] for name, v in metrics.items()}, task=task,
                   num_tasks=num_tasks, epoch=epoch, start=start, steps=steps)
    except NumericalError as err:
      err.config = k
      out[k] = err
  return out


class Result(NamedTuple):
  acc_matrix: np.ndarray          # [T, T]: R[i, j] after task i on task j (test sets)
  curves: list[dict[str, list[float]]]  # per task: per-epoch mean of each train metric
  timings: dict[str, float]
  params: PyTree
  memory: PyTree
  val_acc_matrix: np.ndarray | None = None  # [T, T] on the validation split (None: no split)
  model_state: PyTree = None      # the backbone's final model state (e.g. batch_stats; {}: none)
  diverged: dict | None = None    # sweeps: {config index: divergence_record} (their rows: NaN)


def make_algorithm(cfg: Config, dynamic_p: bool = False) -> algorithms.Algorithm:
  """``dynamic_p``: p is read from ``Hyper.p`` at run time (a sweep over p) instead of fixed."""
  return algorithms.make(cfg.algo, penalty=cfg.penalty, p=None if dynamic_p else float(cfg.p))


def hyper_of(cfg: Config) -> algorithms.Hyper:
  """The run's λ, p, γ and learning rate as float32 (NumPy: no device op, nothing compiled)."""
  return algorithms.Hyper(*(np.float32(v) for v in (cfg.lam, cfg.p, cfg.gamma, cfg.lr)))


class Programs(NamedTuple):
  """The pure functions of one run, ready to ``jit`` (or ``vmap`` then ``jit`` for sweeps)."""
  init: Callable        # (key) -> (params, model_state)
  order: Callable       # (key, count) -> [steps_max * B] int32
  chunk: Callable       # (state, data, order, start_step, task, memory, hyper, stop_step,
  #                        dropout_key) -> (state, metrics)
  evaluate: Callable    # (params, model_state, test, trained_task) -> [T]
  consolidate: Callable  # (memory, params, model_state, data, task, key, hyper) -> memory
  steps_per_epoch: int  # for the largest task


def programs(cfg: Config, net: heads.Network, algo: algorithms.Algorithm,
             train: train_lib.TaskData, preprocess: Callable = train_lib.scale_pixels) -> Programs:
  tx = train_lib.make_optimizer(cfg.optimizer)
  n_max = train.inputs.shape[1]
  steps = _steps_per_epoch(cfg, train)
  example = preprocess(train.inputs[0, :1])

  mode = cfg.consolidated

  def consolidate(memory, params, model_state, data, task_index, key, hyper):
    theta = heads.consolidated(net, params, mode)
    if algo.importance == "unit":
      importance = jax.tree.map(jnp.ones_like, theta)
    else:
      x = data.inputs[task_index]  # preprocessed batch by batch (no [N, ...] float copy)
      mask = jnp.arange(x.shape[0]) < data.counts[task_index]
      if cfg.fisher_examples is not None:  # n rows at random (the labels' key left as it is)
        mask = subset.random_rows(jax.random.fold_in(key, SUBSET_STREAM), mask,
                                  cfg.fisher_examples)
      task_logits = heads.consolidated_logits_fn(net, params, task_index, model_state)
      importance = fisher_lib.fisher_diagonal(
          lambda theta, xb: task_logits(theta, preprocess(xb)), theta, x,
          data.labels[task_index], kind=cfg.fisher,
          batch_size=cfg.fisher_batch_size, key=key, mask=mask,
          normalize_by_num_params=cfg.fisher_normalize,
          runtime_checks=False)  # labels checked when the data are built; no host callback
    return algo.consolidate(memory, theta, importance, task_index, hyper)

  def evaluate(params, model_state, data, trained_task):
    return train_lib.evaluate(net, preprocess, params, data, trained_task, model_state)

  return Programs(
      init=lambda key: _initial_variables(cfg, net, key, example),
      order=lambda key, count: train_lib.epoch_order(key, count, n_max, steps * cfg.batch_size),
      chunk=functools.partial(train_lib.train_chunk, net, algo, tx, preprocess, cfg.batch_size,
                              cfg.chunk_steps, consolidate=mode,
                              augment=augment_lib.make(cfg.augment)),
      evaluate=evaluate,
      consolidate=consolidate,
      steps_per_epoch=steps)


def _steps_per_epoch(cfg: Config, train: train_lib.TaskData) -> int:
  """Train steps of an epoch of the largest task (a partial last batch is a step)."""
  return -(-int(train.inputs.shape[1]) // cfg.batch_size)


def _initial_variables(cfg: Config, net: heads.Network, key: jax.Array, example: jax.Array):
  """``(params, model_state)`` of ``net`` from ``key``, with ``cfg.init``'s initialisation."""
  params, model_state = heads.init_variables(net, key, example)
  return initializers.apply(cfg.init, jax.random.fold_in(key, 0x1417), params), model_state


def _seed_uint32(seed: int) -> np.uint32:
  """``seed`` as the uint32 whose ``jax.random.key`` equals ``jax.random.key(seed)`` of the
  Python integer (x64 off: the key's data are ``[0, seed mod 2**32]``)."""
  if not -2**63 <= int(seed) < 2**64:
    raise errors.SettingError.invalid("seed", seed, "an integer in [-2**63, 2**64)")
  return np.uint32(int(seed) % 2**32)


def _i32(x) -> np.int32:
  """An int32 argument of the compiled programs (NumPy: no eager device op to compile)."""
  return np.int32(x)


class RunState(NamedTuple):
  """Where a run stands: everything needed to continue it exactly (see :func:`run`).

  ``epoch`` equal to the task's number of epochs (:meth:`Config.schedule`) means task ``task``
  is trained but not yet evaluated/consolidated. ``epoch == 0 and step == 0`` means task
  ``task`` starts now (with ``reset_optimizer`` a fresh optimizer is created from
  ``train_state.params``). With a sweep every array has a leading config axis, and
  ``diverged`` maps each config that diverged to its :func:`divergence_record` (it trains on,
  its results are NaN; the other configs are unaffected).
  """
  task: int
  epoch: int
  step: int
  train_state: train_lib.TrainState
  memory: PyTree
  acc: np.ndarray                       # [(K,) T, T]
  curves: list                          # per task: {metric: [per-epoch mean]} (per config)
  epoch_sums: dict                      # running sums of the current epoch's metrics
  val_acc: np.ndarray | None = None     # [(K,) T, T] on the validation split, when held out
  diverged: dict | None = None          # sweeps: {config index: divergence_record(...)}


class Compiled(NamedTuple):
  init: Callable | None  # None when compiled for a resumed run (nothing to initialise)
  init_memory: Callable | None  # (consolidated params) -> the algorithm's empty memory
  new_state: Callable    # (params, model_state, lr) -> TrainState with a fresh optimizer
  order: Callable
  chunk: Callable
  evaluate: Callable
  consolidate: Callable | None
  steps_per_epoch: int
  evaluate_validation: Callable | None = None
  keys: Callable | None = None  # single run: (uint32 seed) -> (init, order, fisher, dropout keys)
  fold: Callable | None = None  # single run: (key, int32) -> jax.random.fold_in(key, ·)


def seed_keys(seed):
  """A run's PRNG keys from its seed: ``(k_init, k_order, k_fisher, k_dropout)``, the first three
  from ``split(key(seed), 3)`` and the dropout stream ``fold_in(k_order, DROPOUT_STREAM)``."""
  k_init, k_order, k_fisher = jax.random.split(jax.random.key(seed), 3)
  return k_init, k_order, k_fisher, jax.random.fold_in(k_order, DROPOUT_STREAM)


def sweep_jit(f: Callable, axes, batched: bool, sharding=None, out=0, **kw) -> Callable:
  """``jit(f)``, ``jit(vmap(f, axes))`` when ``batched``; with a config ``sharding``
  (a ``NamedSharding`` whose first spec entry names the config mesh axis) the vmapped arguments
  (axis 0) and the outputs marked 0 in ``out`` (a prefix of the outputs) are sharded along the
  config axis; the shared arguments (None) and outputs marked None are replicated on the mesh
  (small results read back on the host: readable on every process of a multi-host mesh)."""
  if batched:
    spmd = None if sharding is None else sharding.spec[0]
    f = jax.vmap(f, in_axes=axes, spmd_axis_name=spmd)
  if sharding is None:
    return jax.jit(f, **kw)
  replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  axes = axes if isinstance(axes, tuple) else (axes,)
  place = lambda a: replicated if a is None else sharding  # noqa: E731
  return jax.jit(f, in_shardings=tuple(map(place, axes)),
                 out_shardings=tuple(map(place, out)) if isinstance(out, tuple) else place(out),
                 **kw)


def compile_programs(cfg: Config, net: heads.Network, algo: algorithms.Algorithm,
                     train: train_lib.TaskData, test: train_lib.TaskData, key: jax.Array | None,
                     hyper: algorithms.Hyper, preprocess: Callable, batched: bool,
                     sharding=None, validation: train_lib.TaskData | None = None,
                     init: bool = True,
                     executables: executable_cache.Cached | None = None) -> Compiled:
  """Ahead-of-time compiles every piece once (``batched``: vmapped over a leading config axis).

  Every piece is lowered from abstract shapes (nothing runs), then the XLA compilations (or
  persistent-cache loads) run on a thread pool: they release the GIL, and the init program
  (one random op per parameter) compiles about as long as the train chunk. ``init=False``
  (a resumed run) lowers the init programs (parameters, empty memory) for their shapes but
  does not compile them.

  The sweep path is literally ``jax.vmap`` of the single-run functions, data shared;
  ``sharding`` places the config axis on a device mesh (see :func:`sweep_jit`).

  ``key``: the init key (its shape and type; ``None``: a single run's, whose keys then come
  from the compiled ``keys`` program, with ``fold`` for their ``fold_in``).

  ``executables``: a store and the key of these programs (:mod:`ewc_jax.executable_cache`):
  when the store holds them they are loaded (nothing is traced, lowered or compiled),
  otherwise they are compiled and saved there.
  """
  num_tasks = int(train.inputs.shape[0])
  names = ["order", "new_state", "chunk", "evaluate"]
  names += ["init", "init_memory"] if init else []
  names += ["evaluate_validation"] if validation is not None else []
  names += ["consolidate"] if algo.importance is not None and num_tasks > 1 else []
  names += ["keys", "fold"] if not batched else []
  loaded = executables.store.load(executables.key, names) if executables is not None else None
  if loaded is not None:
    return _compiled(loaded, _steps_per_epoch(cfg, train))
  progs = programs(cfg, net, algo, train, preprocess)
  if key is None:  # a single run's key, for its shape (traced only when compiling)
    key = jax.eval_shape(lambda: jax.random.key(0))
  tx = train_lib.make_optimizer(cfg.optimizer)
  jit = functools.partial(sweep_jit, batched=batched, sharding=sharding)
  if executables is not None:  # programs named after the key: see _named
    jit = _named(jit, executables.key)
  zero = _i32(0)
  lowered = {"init": jit(progs.init, 0).lower(key),
             "order": jit(progs.order, (0, None)).lower(key, zero)}
  (params, model_state), order0 = lowered["init"].out_info, lowered["order"].out_info
  theta = heads.consolidated(net, params, cfg.consolidated)
  lowered["init_memory"] = jit(lambda b: algo.init(b, num_tasks), 0).lower(theta)
  lowered["new_state"] = jit(lambda p, ms, lr: train_lib.init_train_state(tx, p, lr, ms),
                             (0, 0, 0)).lower(params, model_state, hyper.lr)
  memory, state = lowered["init_memory"].out_info, lowered["new_state"].out_info
  lowered["chunk"] = jit(progs.chunk, (0, None, 0, None, None, 0, 0, None, 0), out=(0, None),
                         donate_argnums=0).lower(state, train, order0, zero, zero, memory, hyper,
                                                 zero, key)
  lowered["evaluate"] = jit(progs.evaluate, (0, 0, None, None), out=None).lower(
      params, model_state, test, zero)
  if "evaluate_validation" in names:
    lowered["evaluate_validation"] = jit(progs.evaluate, (0, 0, None, None), out=None).lower(
        params, model_state, validation, zero)
  if "consolidate" in names:
    lowered["consolidate"] = jit(progs.consolidate, (0, 0, 0, None, None, 0, 0),
                                 donate_argnums=0).lower(memory, params, model_state, train, zero,
                                                         key, hyper)
  if not batched:  # the seed's keys and their fold_in, compiled (stored) like the rest
    lowered["keys"] = jit(seed_keys, 0, out=None).lower(np.uint32(0))
    lowered["fold"] = jit(jax.random.fold_in, (0, None), out=None).lower(key, zero)
  lowered = {name: lowered[name] for name in names}  # without init: its shapes only
  workers = max(1, min(len(lowered), os.cpu_count() or 1))
  with executable_cache.persistent_cache_hits() as hits:
    with concurrent.futures.ThreadPoolExecutor(workers,
                                               thread_name_prefix="ewc_jax-compile") as ex:
      compiled = dict(zip(lowered, ex.map(lambda lo: lo.compile(), lowered.values())))
  if executables is not None and not hits:
    executables.store.save(executables.key, compiled)
  return _compiled(compiled, progs.steps_per_epoch)


def _named(jit: Callable, key: str) -> Callable:
  """``jit`` whose programs are named after the store's ``key`` (``<function>_<digest>``).

  The name is part of the lowered module, hence of the key of JAX's persistent compilation
  cache: programs that the store does not hold are compiled afresh (not loaded from that cache,
  whose executables cannot be serialised again on CPU, see :mod:`ewc_jax.executable_cache`),
  so the store gets them and the next run loads them."""
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]

  def named_jit(f, *args, **kwargs):
    def program(*a, **k):
      return f(*a, **k)
    name = getattr(f, "__name__", None) or getattr(getattr(f, "func", None), "__name__",
                                                   "program")
    program.__name__ = program.__qualname__ = f"{name.strip('<>')}_{digest}"
    return jit(program, *args, **kwargs)
  return named_jit


def _compiled(programs_: dict, steps_per_epoch: int) -> Compiled:
  return Compiled(programs_.get("init"), programs_.get("init_memory"), programs_["new_state"],
                  programs_["order"], programs_["chunk"], programs_["evaluate"],
                  programs_.get("consolidate"), steps_per_epoch,
                  programs_.get("evaluate_validation"), programs_.get("keys"),
                  programs_.get("fold"))


def run(cfg: Config, net: heads.Network, train: train_lib.TaskData, test: train_lib.TaskData,
        *, preprocess: Callable = train_lib.scale_pixels,
        progress: Callable[[int, int], Any] | None = None,
        hyper: algorithms.Hyper | None = None, seeds: Sequence[int] | None = None,
        resume: RunState | None = None,
        on_checkpoint: Callable[[RunState, str], None] | None = None,
        dynamic_p: bool = False, sharding: jax.sharding.NamedSharding | None = None,
        executables: executable_cache.Cached | None = None) -> Result:
  """Trains tasks ``0..T-1`` in order; returns the accuracy matrix, curves and timings.

  Args:
    cfg: the configuration (its ``lam``, ``p``, ``gamma``, ``lr`` and ``seed`` are overridden
      by ``hyper``/``seeds`` in a sweep).
    net, train, test: the network and padded task data (test: one set per task). ``net`` is
      :func:`make_network` of ``cfg`` or any :class:`ewc_jax.heads.Network`, e.g.
      ``heads.make_network(cfg.scenario, groups, backbone=MyModule())`` with your own Flax linen
      backbone (protocol: :mod:`ewc_jax.backbones`; its ``batch_stats`` and other non-``params``
      collections are trained, saved and swept as described in the module docstring).
      ``preprocess`` maps a batch of ``train.inputs`` rows to the backbone's inputs (default:
      pixels / 255, shape kept: images for the convolutional backbones).
    progress: ``progress(task_index, total_steps, done_steps)`` may return a tqdm-like bar
      (``update(n)``, ``set_postfix(dict)``, ``close()``).
    hyper, seeds: a sweep: ``hyper`` fields with a leading axis of K configs and ``seeds`` of
      length K. Every piece is then ``jax.vmap``-ed over that axis (same functions, data shared)
      and results carry a leading K axis.
    resume: continue from a :class:`RunState` (e.g. restored from a checkpoint).
      With ``cfg.validation_fraction > 0`` that fraction of each task's training data is held
      out (:func:`ewc_jax.holdout.split`) and scored like the test sets
      (``Result.val_acc_matrix``).
    on_checkpoint: called with ``(RunState, reason)`` after every train chunk
      (``reason="chunk"``) and after each task is consolidated (``reason="task"``).
    dynamic_p: take p from ``hyper.p`` at run time (needed when a sweep varies p).
    sharding: (sweeps) a ``NamedSharding`` of the config axis over a device mesh, e.g.
      ``NamedSharding(mesh, P("config"))``; K must be a multiple of that mesh axis. Data are
      replicated on the mesh. See :mod:`ewc_jax.sweep`.
    executables: load the compiled programs from (else save them to) a store under a key that
      names everything they are built from (:mod:`ewc_jax.executable_cache`; the caller's
      promise: the command lines pass one, a library user with their own module should not).
  """
  cfg.validate()
  num_tasks = int(train.inputs.shape[0])
  algo = make_algorithm(cfg, dynamic_p)
  validation = None
  if cfg.validation_fraction > 0:
    train, validation = holdout.split(train, cfg.validation_fraction, cfg.validation_seed)
  smallest = int(np.asarray(train.counts).min())
  if cfg.batch_size > smallest:
    task = int(np.asarray(train.counts).argmin()) + 1
    held = ", after holding out the validation split" if validation is not None else ""
    raise errors.SettingError(lambda n: (
        f"{n('batch_size')}={cfg.batch_size} is invalid: expected at most {smallest}, the number "
        f"of training examples of the smallest task (task {task}{held})."))
  if algo.joint:
    train = task_data.cumulative(train)
  batched = seeds is not None
  if sharding is not None and not batched:
    raise ValueError("`sharding` needs a sweep (`seeds` and `hyper` with a config axis).")
  if batched:
    hyper = algorithms.Hyper(*(jnp.asarray(v, jnp.float32) for v in hyper))
    k_init, k_order, k_fisher, k_dropout = jax.vmap(seed_keys)(
        np.array([_seed_uint32(s) for s in seeds], np.uint32))
    fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
    if sharding is not None:  # placed from host (numpy) values: works on a multi-host mesh too
      replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
      hyper = jax.device_put(algorithms.Hyper(*(np.asarray(v) for v in hyper)), sharding)
      k_init, k_order, k_fisher, k_dropout = (
          jax.random.wrap_key_data(jax.device_put(np.asarray(jax.random.key_data(k)), sharding))
          for k in (k_init, k_order, k_fisher, k_dropout))
      train, test, validation = jax.device_put((train, test, validation), replicated)
      fold = sweep_jit(jax.random.fold_in, (0, None), True, sharding)  # keys stay on the mesh
  else:
    hyper = hyper_of(cfg) if hyper is None else hyper
    k_init = None  # the keys come from c.keys below (compile_programs: its abstract shape)
  timings = {"compile": 0.0, "train": 0.0, "fisher": 0.0, "eval": 0.0}

  t0 = time.perf_counter()
  c = compile_programs(cfg, net, algo, train, test, k_init, hyper, preprocess, batched,
                       sharding, validation, init=resume is None, executables=executables)
  timings["compile"] = time.perf_counter() - t0
  if not batched:  # compiled: nothing is traced or compiled for them at run time
    k_init, k_order, k_fisher, k_dropout = c.keys(_seed_uint32(cfg.seed))
    fold = lambda key, data: c.fold(key, _i32(data))  # noqa: E731

  lead = (len(seeds),) if batched else ()
  if resume is None:
    params, model_state = c.init(k_init)
    rs = RunState(task=0, epoch=0, step=0,
                  train_state=c.new_state(params, model_state, hyper.lr),
                  memory=c.init_memory(heads.consolidated(net, params, cfg.consolidated)),
                  acc=np.zeros(lead + (num_tasks, num_tasks)), curves=[], epoch_sums={},
                  val_acc=(None if validation is None else
                           np.zeros(lead + (num_tasks, num_tasks))),
                  diverged={} if batched else None)
  else:
    rs = resume if not batched or resume.diverged is not None else resume._replace(diverged={})
  loop = _Loop(cfg, c, train, test, validation, hyper, k_order, k_fisher, k_dropout, fold,
               lead, progress, on_checkpoint, timings)
  while rs.task < num_tasks:
    rs = _train_task(loop, rs)
    rs = _evaluate_and_consolidate(loop, rs)
    if on_checkpoint is not None:
      on_checkpoint(rs, "task")
  return Result(acc_matrix=rs.acc, curves=rs.curves, timings=timings,
                params=rs.train_state.params, memory=rs.memory, val_acc_matrix=rs.val_acc,
                model_state=rs.train_state.model_state, diverged=rs.diverged)


class _Loop(NamedTuple):
  """What the per-task parts of :func:`run` share (compiled programs, data, keys, hooks)."""
  cfg: Config
  c: Compiled
  train: train_lib.TaskData
  test: train_lib.TaskData
  validation: train_lib.TaskData | None
  hyper: algorithms.Hyper
  k_order: jax.Array
  k_fisher: jax.Array
  k_dropout: jax.Array
  fold: Callable
  lead: tuple
  progress: Callable | None
  on_checkpoint: Callable | None
  timings: dict          # seconds, updated in place


def _train_task(loop: _Loop, rs: RunState) -> RunState:
  """Trains task ``rs.task`` from its position (epoch, step) to its end, chunk by chunk; the
  RunState after every chunk goes to ``on_checkpoint(rs, "chunk")``."""
  cfg, c, t = loop.cfg, loop.c, rs.task
  num_tasks = int(loop.train.inputs.shape[0])
  count = int(np.asarray(loop.train.counts)[t])
  epochs, steps, last_steps = cfg.schedule(count)
  state = rs.train_state
  if rs.epoch == 0 and rs.step == 0:
    if cfg.reset_optimizer or t == 0:  # the optimizer restarts at every task, or at the first
      state = c.new_state(state.params, state.model_state, loop.hyper.lr)
    rs = rs._replace(curves=rs.curves[:t] + [{k: [] for k in train_lib.METRIC_NAMES}],
                     epoch_sums={})
  done = rs.epoch * steps + rs.step
  total_steps = (epochs - 1) * steps + last_steps
  bar = (loop.progress(t, total_steps, done) if loop.progress and rs.epoch < epochs
         else None)
  t0 = time.perf_counter()
  epoch, start, sums, curves = rs.epoch, rs.step, dict(rs.epoch_sums), rs.curves
  while epoch < epochs:
    stop = last_steps if epoch == epochs - 1 else steps
    order = c.order(loop.fold(loop.fold(loop.k_order, t), epoch), _i32(count))
    k_dropout = loop.fold(loop.fold(loop.k_dropout, t), epoch)
    if not sums:
      sums = {k: np.zeros(loop.lead) for k in ("count",) + train_lib.METRIC_NAMES}
    while start < stop:
      prev = start
      state, m = c.chunk(state, loop.train, order, _i32(start), _i32(t), rs.memory, loop.hyper,
                         _i32(stop), k_dropout)
      m = jax.device_get(m)
      try:  # before anything of this chunk is kept (sums, RunState, checkpoint)
        rs = _check_chunk(m, rs, task=t, num_tasks=num_tasks, epoch=epoch, start=start,
                          steps=stop)
      except NumericalError:
        if bar is not None:
          bar.close()
        raise
      n = m["count"]
      sums = {"count": sums["count"] + n.sum(-1),
              **{k: sums[k] + np.sum(m[k] * n, -1) for k in train_lib.METRIC_NAMES}}
      start = min(start + cfg.chunk_steps, stop)
      if bar is not None:
        bar.update(start - prev)
        means = {k: float(np.mean(np.sum(m[k] * n, -1) / np.maximum(n.sum(-1), 1)))
                 for k in ("loss_cls", "loss_reg", "acc")}
        bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
      finished = start >= stop
      if finished:
        means = _epoch_means(sums)
        cur = curves[t]
        curves = curves[:t] + [{k: cur[k] + [means[k].tolist()] for k in cur}]
        epoch, start, sums = epoch + 1, 0, {}
      rs = rs._replace(epoch=epoch, step=start, train_state=state, curves=curves,
                       epoch_sums=sums)
      if loop.on_checkpoint is not None:
        loop.on_checkpoint(rs, "chunk")
      if finished:
        break
  jax.block_until_ready(state.params)
  loop.timings["train"] += time.perf_counter() - t0
  if bar is not None:
    bar.close()
  return rs._replace(train_state=state)


def _check_chunk(m: dict, rs: RunState, **where) -> RunState:
  """A chunk's finiteness check: a single run stops (:class:`NumericalError`); a sweep records
  the configs that diverged in ``rs.diverged`` and goes on (under ``vmap`` a config's NaN never
  reaches another; the caller reports them)."""
  if rs.diverged is None:
    check_finite(m, **where)
    return rs
  new = new_divergences(m, rs.diverged, **where)
  if not new:
    return rs
  return rs._replace(diverged={**rs.diverged, **{k: divergence_record(e) for k, e in new.items()}})


def _epoch_means(sums: dict) -> dict:
  total = np.maximum(sums["count"], 1.0)
  return {k: sums[k] / total for k in train_lib.METRIC_NAMES}


def _evaluate_and_consolidate(loop: _Loop, rs: RunState) -> RunState:
  """After training task t: row t of the test (and validation) accuracy matrix, then (except
  after the last task) the memory update with the importance of task t; the RunState of the
  start of task t + 1."""
  c, t, state = loop.c, rs.task, rs.train_state
  num_tasks = int(loop.train.inputs.shape[0])
  t0 = time.perf_counter()
  acc = rs.acc.copy()
  acc[..., t, :] = np.asarray(c.evaluate(state.params, state.model_state, loop.test, _i32(t)))
  val_acc = rs.val_acc
  if loop.validation is not None:
    val_acc = val_acc.copy()
    val_acc[..., t, :] = np.asarray(c.evaluate_validation(
        state.params, state.model_state, loop.validation, _i32(t)))
  loop.timings["eval"] += time.perf_counter() - t0
  for k in rs.diverged or {}:  # a diverged config's accuracy is not a result
    acc[k, t, :] = np.nan
    if val_acc is not None:
      val_acc[k, t, :] = np.nan
  memory = rs.memory
  if c.consolidate is not None and t < num_tasks - 1:
    t0 = time.perf_counter()
    memory = jax.block_until_ready(c.consolidate(
        memory, state.params, state.model_state, loop.train, _i32(t),
        loop.fold(loop.k_fisher, t), loop.hyper))
    loop.timings["fisher"] += time.perf_counter() - t0
  return RunState(task=t + 1, epoch=0, step=0, train_state=state, memory=memory, acc=acc,
                  curves=rs.curves, epoch_sums={}, val_acc=val_acc, diverged=rs.diverged)
