"""Backbone + heads: the continual-learning network as plain Flax modules and pure functions.

The network is a backbone module (shared across tasks) and a ``dict`` of head modules.
Parameters are one pytree ``{"backbone": ..., "heads": {name: ...}}``. What EWC consolidates is
every parameter that more than one task uses (:func:`consolidated`): the backbone, plus the
shared head in the domain- and class-incremental scenarios; per-task heads stay free.
Three scenarios (van de Ven & Tolias 2019):

* task-incremental (``"task"``): one head per task, each with that task's classes; the task id
  picks the head at training and test time.
* domain-incremental (``"domain"``): one shared head with the per-task number of classes; the
  task id is never used.
* class-incremental (``"class"``): one head over all classes; on task t (and when evaluating
  after task t) only the classes seen so far are active, the others are masked out.

Heads are picked by an *array* of head ids (a scalar, or one per example, e.g. for joint
training on several tasks at once): every head's logits are computed (heads are tiny next to the
backbone) and selected per example, so one compiled program serves every task, also under vmap.

The backbone is any Flax linen module (:mod:`ewc_jax.backbones`: by name, ``"mlp"``, ``"cnn"``,
``"resnet18"``, ..., or your own instance). Its variable collections other than ``params`` (e.g.
BatchNorm's ``batch_stats``) are the *model state*, a pytree ``{collection: ...}`` beside the
parameters (``{}`` for a stateless backbone): :func:`init_variables` creates both,
:func:`train_logits` (train mode: batch statistics, dropout) returns the updated model state, and
:func:`logits` / :func:`features` run in evaluation mode on the given model state. Heads are
stateless. EWC consolidates parameters only (:func:`consolidated`): the model state is not part
of θ and is not protected by the penalty.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import backbones

PyTree = Any
SCENARIOS = ("task", "domain", "class")
CONSOLIDATE = ("shared", "backbone", "all")
_MASKED = -1e9


class Network(NamedTuple):
  """A backbone, a dict of head modules, and how tasks map onto them.

  Attributes:
    backbone: the shared feature extractor.
    heads: head modules by name, in head-id order.
    scenario: ``"task" | "domain" | "class"``.
    head_of_task: head id of each task.
    active_classes: for class-incremental, ``active_classes[t][c]`` is True when class c has been
      seen by the end of task t (tuple of tuples; ``None`` for the other scenarios).
  """
  backbone: nn.Module
  heads: dict[str, nn.Module]
  scenario: str = "task"
  head_of_task: tuple[int, ...] = ()
  active_classes: tuple[tuple[bool, ...], ...] | None = None

  @property
  def task_names(self) -> list[str]:
    return list(self.heads)


def task_name(index: int) -> str:
  """Name of the head of task ``index`` (0-based): ``"task_1"``, ``"task_2"``, ..."""
  return f"task_{index + 1}"


def _check(num_tasks: int, classes: int, what: str) -> None:
  if num_tasks < 1:
    raise ValueError(f"`num_tasks` should be >= 1, but got num_tasks={num_tasks}.")
  if classes < 1:
    raise ValueError(f"`{what}` should be >= 1, but got {what}={classes}.")


def make_backbone(backbone: str | nn.Module = "mlp", hidden: Sequence[int] = (400, 400),
                  **options) -> nn.Module:
  """The backbone module: ``backbone`` a name of :data:`ewc_jax.backbones.NAMES` (built with
  ``options``; ``hidden`` is the ``mlp``'s widths and ignored by the others) or a Flax linen
  module instance, used as is (see :mod:`ewc_jax.backbones` for the protocol)."""
  if _is_nnx_module(backbone):
    raise ValueError(f"`backbone` must be a Flax linen module or a name, but got the NNX module "
                     f"{type(backbone).__name__}: wrap its class as "
                     f"`flax.nnx.bridge.to_linen({type(backbone).__name__}, *args, **kwargs)` "
                     f"(see ewc_jax.backbones, 'An NNX module').")
  if isinstance(backbone, nn.Module):
    _check_nnx_modes(backbone)
    if options:
      raise ValueError(f"backbone options {sorted(options)} need a backbone name, but got the "
                       f"module {type(backbone).__name__} (configure the module itself).")
    return backbone
  if not isinstance(backbone, str):
    raise ValueError(f"`backbone` must be one of {', '.join(backbones.NAMES)} or a Flax linen "
                     f"module, but got backbone={backbone!r}.")
  if backbone == "mlp":
    options = {"hidden": tuple(hidden), **options}
  return backbones.make(backbone, **options)


def task_incremental(num_tasks: int, classes_per_task: int,
                     hidden: Sequence[int] = (400, 400), *,
                     backbone: str | nn.Module = "mlp", **options) -> Network:
  """A backbone (:func:`make_backbone`; default the MLP) and one ``nn.Dense(classes_per_task)``
  head per task."""
  _check(num_tasks, classes_per_task, "classes_per_task")
  heads = {task_name(t): nn.Dense(classes_per_task, name=task_name(t)) for t in range(num_tasks)}
  return Network(make_backbone(backbone, hidden, **options), heads, "task",
                 tuple(range(num_tasks)))


def domain_incremental(num_tasks: int, classes_per_task: int,
                       hidden: Sequence[int] = (400, 400), *,
                       backbone: str | nn.Module = "mlp", **options) -> Network:
  """A backbone (:func:`make_backbone`) and one shared ``nn.Dense(classes_per_task)`` head."""
  _check(num_tasks, classes_per_task, "classes_per_task")
  return Network(make_backbone(backbone, hidden, **options),
                 {"shared": nn.Dense(classes_per_task, name="shared")}, "domain",
                 (0,) * num_tasks)


def class_incremental(class_groups: Sequence[Sequence[int]],
                      hidden: Sequence[int] = (400, 400), *,
                      backbone: str | nn.Module = "mlp", **options) -> Network:
  """A backbone (:func:`make_backbone`) and one head over all classes; classes become active
  task by task."""
  groups = [list(g) for g in class_groups]
  num_classes = 1 + max(c for g in groups for c in g)
  _check(len(groups), num_classes, "num_classes")
  active, seen = [], np.zeros(num_classes, bool)
  for g in groups:
    seen[g] = True
    active.append(tuple(bool(v) for v in seen))
  return Network(make_backbone(backbone, hidden, **options),
                 {"shared": nn.Dense(num_classes, name="shared")}, "class", (0,) * len(groups),
                 tuple(active))


def _is_nnx_module(obj: Any) -> bool:
  """Whether ``obj`` is an ``flax.nnx.Module`` instance (without importing NNX for others)."""
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(obj, nnx.Module)


def _check_nnx_modes(module: nn.Module) -> None:
  """Refuses an NNX module wrapped by ``flax.nnx.bridge.to_linen`` whose ``__call__`` takes no
  ``train`` but which holds layers with a train/eval mode (``nnx.BatchNorm``'s
  ``use_running_average``, ``nnx.Dropout``'s ``deterministic``, ...): the wrapper rebuilds the
  module at every call, so ``.train()`` / ``.eval()`` never reach it, and evaluation would run
  it in its constructor's mode (batch statistics or live dropout) without a word."""
  nnx_class = getattr(module, "nnx_class", None)
  if nnx_class is None or _takes_train(module):
    return
  from flax import nnx  # pylint: disable=import-outside-toplevel
  def build():
    kwargs = dict(getattr(module, "kwargs", {}) or {})
    if not getattr(module, "skip_rng", False):
      kwargs["rngs"] = nnx.Rngs(0)
    return nnx_class(*getattr(module, "args", ()), **kwargs)
  abstract = nnx.eval_shape(build)
  moded = sorted({f"{'.'.join(map(str, path)) or '(root)'} ({type(m).__name__})"
                  for path, m in nnx.iter_graph(abstract)
                  if isinstance(m, nnx.Module)
                  and any(hasattr(m, a) for a in ("use_running_average", "deterministic"))})
  if moded:
    raise ValueError(
        f"`backbone` {nnx_class.__name__} (NNX, through flax.nnx.bridge.to_linen) has layers with "
        f"a train/eval mode: {', '.join(moded)}; its `__call__` must take `train: bool` and pass "
        f"it on (e.g. `self.bn(x, use_running_average=not train)`, `self.drop(x, "
        f"deterministic=not train)`): the runner sets it, and .train()/.eval() do not reach "
        f"a module rebuilt at every call.")


def make_network(scenario: str, class_groups: Sequence[Sequence[int]],
                 hidden: Sequence[int] = (400, 400), *, backbone: str | nn.Module = "mlp",
                 **options) -> Network:
  """The network of ``scenario`` for tasks made of ``class_groups`` (equal-sized for task/domain).

  ``backbone``: a name of :data:`ewc_jax.backbones.NAMES` with its ``options`` (e.g.
  ``backbone="resnet18", width=20, input_shape=(32, 32, 3)``; ``hidden`` is the MLP's), or your
  own Flax linen module (see :mod:`ewc_jax.backbones`)."""
  if scenario not in SCENARIOS:
    raise ValueError(f"`scenario` must be one of {', '.join(SCENARIOS)}, but got "
                     f"scenario={scenario!r}.")
  if scenario == "class":
    return class_incremental(class_groups, hidden, backbone=backbone, **options)
  sizes = {len(g) for g in class_groups}
  if len(sizes) != 1:
    raise ValueError(f"`class_groups` must all have the same size for scenario={scenario!r}, "
                     f"got sizes {sorted(sizes)}.")
  build = task_incremental if scenario == "task" else domain_incremental
  return build(len(class_groups), sizes.pop(), hidden, backbone=backbone, **options)


def _takes_train(module: nn.Module) -> bool:
  """Whether the module's ``__call__`` takes ``train``. An NNX module wrapped by
  ``flax.nnx.bridge.to_linen`` is asked through its ``nnx_class`` (the wrapper's own
  ``__call__`` takes ``**kwargs`` and passes them on)."""
  nnx_class = getattr(module, "nnx_class", None)
  call = nnx_class.__call__ if nnx_class is not None else module.__call__
  return "train" in inspect.signature(call).parameters


def _mode(module: nn.Module, train: bool) -> dict:
  """``{"train": train}`` when the module's ``__call__`` takes ``train``, else ``{}``."""
  return {"train": train} if _takes_train(module) else {}


def init_variables(net: Network, key: jax.Array, example: jax.Array) -> tuple[PyTree, PyTree]:
  """``(params, model_state)`` from one PRNG key: ``params = {"backbone": ..., "heads": {name:
  ...}}`` and ``model_state`` the backbone's other collections (e.g. ``{"batch_stats": ...}``;
  ``{}`` for a stateless backbone). The backbone is initialised in evaluation mode."""
  kb, kh = jax.random.split(key)
  # A "dropout" stream too: an NNX module wrapped by ``flax.nnx.bridge.to_linen`` builds its
  # ``nnx.Dropout(rngs=...)`` at init; linen modules ignore it (``params`` still draws from kb).
  rngs = {"params": kb, "dropout": jax.random.fold_in(kb, 1)}
  variables = dict(net.backbone.init(rngs, example, **_mode(net.backbone, False)))
  backbone = variables.pop("params", {})
  feats = features(net, backbone, example, variables)
  head_keys = jax.random.split(kh, len(net.heads))
  heads = {name: module.init(k, feats)["params"]
           for (name, module), k in zip(net.heads.items(), head_keys)}
  return {"backbone": backbone, "heads": heads}, variables


def init_params(net: Network, key: jax.Array, example: jax.Array) -> PyTree:
  """Initialises ``{"backbone": ..., "heads": {name: ...}}`` from one PRNG key (the parameters
  of :func:`init_variables`)."""
  return init_variables(net, key, example)[0]


def features(net: Network, backbone_params: PyTree, x: jax.Array,
             model_state: PyTree = None) -> jax.Array:
  """``[B, F]`` backbone features in evaluation mode (BatchNorm on the running statistics of
  ``model_state``, dropout off)."""
  return net.backbone.apply({"params": backbone_params, **(model_state or {})}, x,
                            **_mode(net.backbone, False))


def train_features(net: Network, backbone_params: PyTree, model_state: PyTree, x: jax.Array,
                   rng: jax.Array | None = None) -> tuple[jax.Array, PyTree]:
  """``(features, model_state)`` in train mode: BatchNorm on the batch statistics (the running
  ones updated in the returned model state), dropout drawing from ``rng`` (the ``"dropout"``
  stream; ``None``: no PRNG given, for backbones without dropout)."""
  variables = {"params": backbone_params, **(model_state or {})}
  kwargs = dict(_mode(net.backbone, True), rngs=None if rng is None else {"dropout": rng})
  if not model_state:
    return net.backbone.apply(variables, x, **kwargs), model_state
  feats, updates = net.backbone.apply(variables, x, mutable=list(model_state), **kwargs)
  return feats, {**model_state, **updates}


def head_logits(net: Network, head_params: dict[str, PyTree], feats: jax.Array,
                task_ids: Any, seen_through: Any = None) -> jax.Array:
  """``[B, C]`` logits of the head of each example's task.

  Args:
    task_ids: task index (int or int32 array), a scalar or one per example ``[B]``.
    seen_through: class-incremental only: mask classes not seen by the end of this task
      (defaults to ``task_ids``).
  """
  task_ids = jnp.asarray(task_ids, jnp.int32)
  if len(net.heads) == 1:
    name, module = next(iter(net.heads.items()))
    logits = module.apply({"params": head_params[name]}, feats)
  else:
    stacked = _all_heads(net, head_params, feats)  # [B, H, C]
    head_ids = jnp.asarray(net.head_of_task, jnp.int32)[task_ids]
    head_ids = jnp.broadcast_to(head_ids, feats.shape[:1])
    logits = jnp.take_along_axis(stacked, head_ids[:, None, None], axis=1)[:, 0]
  if net.active_classes is not None:
    through = task_ids if seen_through is None else jnp.asarray(seen_through, jnp.int32)
    active = jnp.asarray(np.array(net.active_classes))[through]
    logits = jnp.where(active, logits, _MASKED)
  return logits


def _plain_dense(module: nn.Module) -> bool:
  """An ``nn.Dense`` that computes exactly ``x @ kernel + bias`` in float32."""
  # pylint: disable-next=unidiomatic-typecheck
  return (type(module) is nn.Dense and module.use_bias and module.dtype is None
          and module.param_dtype == jnp.float32 and module.precision is None
          and module.dot_general is None and module.dot_general_cls is None)


def _all_heads(net: Network, head_params: dict[str, PyTree], feats: jax.Array) -> jax.Array:
  """``[B, H, C]`` logits of every head.

  Plain ``nn.Dense`` heads (the built-in scenarios) are applied as one matmul with their kernels
  side by side (``feats @ [W_1 ... W_H]``): the same numbers as head by head, but one dot and one
  weight-gradient dot per step instead of H tiny ones (they cost ~10% of a train step at H = 5).
  """
  modules = list(net.heads.values())
  if len({getattr(m, "features", None) for m in modules}) == 1 and all(map(_plain_dense, modules)):
    kernels = [head_params[name]["kernel"] for name in net.heads]
    biases = [head_params[name]["bias"] for name in net.heads]
    out = feats @ jnp.concatenate(kernels, axis=1) + jnp.concatenate(biases)
    return out.reshape(feats.shape[:1] + (len(modules), modules[0].features))
  outs = [m.apply({"params": head_params[name]}, feats) for name, m in net.heads.items()]
  if len({o.shape[-1] for o in outs}) != 1:
    raise ValueError("all heads must have the same number of classes to be selected by id")
  return jnp.stack(outs, axis=1)


def logits(net: Network, params: PyTree, x: jax.Array, task_ids: Any,
           seen_through: Any = None, model_state: PyTree = None) -> jax.Array:
  """``[B, C]`` logits of the whole network in evaluation mode (see :func:`head_logits`)."""
  return head_logits(net, params["heads"],
                     features(net, params["backbone"], x, model_state), task_ids, seen_through)


def train_logits(net: Network, params: PyTree, model_state: PyTree, x: jax.Array, task_ids: Any,
                 *, seen_through: Any = None, rng: jax.Array | None = None
                 ) -> tuple[jax.Array, PyTree]:
  """``([B, C] logits, model_state)`` in train mode (see :func:`train_features`)."""
  feats, model_state = train_features(net, params["backbone"], model_state, x, rng)
  return head_logits(net, params["heads"], feats, task_ids, seen_through), model_state


def consolidated_heads(net: Network, consolidate: str = "shared") -> tuple[str, ...]:
  """Names of the heads in the consolidated set.

  ``"shared"``: the heads used by more than one task (domain-IL's shared head, class-IL's single
  head; none of the per-task heads of task-IL); ``"backbone"``: none; ``"all"``: every head.
  """
  if consolidate not in CONSOLIDATE:
    raise ValueError(f"`consolidate` must be one of {', '.join(CONSOLIDATE)}, but got "
                     f"consolidate={consolidate!r}.")
  if consolidate == "backbone":
    return ()
  names = list(net.heads)
  if consolidate == "all":
    return tuple(names)
  uses = np.bincount(np.asarray(net.head_of_task, np.int64), minlength=len(names))
  return tuple(n for n, u in zip(names, uses) if u > 1)


def consolidated(net: Network, params: PyTree, consolidate: str = "shared") -> PyTree:
  """θ, the parameters EWC consolidates: ``{"backbone": ...}`` plus ``"heads": {name: ...}``
  for the heads of :func:`consolidated_heads` (absent when there are none).

  This subtree is what the importance (Fisher) is computed for, what anchors hold and what the
  penalty reads; the other parameters (per-task heads) are never penalised.
  """
  names = consolidated_heads(net, consolidate)
  theta = {"backbone": params["backbone"]}
  if names:
    theta["heads"] = {n: params["heads"][n] for n in names}
  return theta


def with_consolidated(params: PyTree, theta: PyTree) -> PyTree:
  """``params`` with the leaves of ``theta`` (a :func:`consolidated` subtree) put in."""
  return {"backbone": theta["backbone"],
          "heads": {**params["heads"], **theta.get("heads", {})}}


def consolidated_logits_fn(net: Network, params: PyTree, task_index: Any,
                           model_state: PyTree = None):
  """``logits_fn(theta, x)`` of one task's head, a function of the consolidated subtree only
  (what :func:`ewc_jax.fisher.fisher_diagonal` weighs); the other parameters are closed over.
  Evaluation mode, on the running statistics of ``model_state`` (so the importance of an example
  does not depend on the others of its batch). Class-incremental: classes not seen by the end of
  ``task_index`` are masked, so their head rows get zero gradient and zero importance."""
  return lambda theta, x: logits(net, with_consolidated(params, theta), x, task_index,
                                 model_state=model_state)


def backbone_logits_fn(net: Network, head_params: dict[str, PyTree], task_index: Any,
                       model_state: PyTree = None):
  """``logits_fn(backbone_params, x)`` for one task's head, a function of the bare backbone
  pytree (the heads closed over: they never appear in the importance pytree), in evaluation
  mode. The runner uses :func:`consolidated_logits_fn` in every mode; this is for weighing the
  backbone alone."""
  return lambda backbone_params, x: head_logits(
      net, head_params, features(net, backbone_params, x, model_state), task_index)
