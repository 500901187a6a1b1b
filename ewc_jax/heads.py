"""Backbone + heads: the continual-learning network as plain Flax modules and pure functions.

The network is a backbone module (shared across tasks, the only part EWC consolidates) and a
``dict`` of head modules keyed by task name (task-incremental: one head per task, each with that
task's classes). Parameters are one pytree ``{"backbone": ..., "heads": {name: ...}}``.

The head is picked with an *array* task index through ``lax.switch``, so one compiled program
serves every task (the task index is data, not a Python constant).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any


class MLP(nn.Module):
  """Fully connected ReLU backbone (784-400-400 in van de Ven & Tolias 2019)."""
  hidden: Sequence[int] = (400, 400)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return x


class Network(NamedTuple):
  """A backbone module and a dict of per-task head modules (keys ordered by task)."""
  backbone: nn.Module
  heads: dict[str, nn.Module]

  @property
  def task_names(self) -> list[str]:
    return list(self.heads)


def task_name(index: int) -> str:
  """Name of the head of task ``index`` (0-based): ``"task_1"``, ``"task_2"``, ..."""
  return f"task_{index + 1}"


def task_incremental(num_tasks: int, classes_per_task: int,
                     hidden: Sequence[int] = (400, 400)) -> Network:
  """MLP backbone and one ``nn.Dense(classes_per_task)`` head per task."""
  if num_tasks < 1:
    raise ValueError(f"`num_tasks` should be >= 1, but got num_tasks={num_tasks}.")
  if classes_per_task < 1:
    raise ValueError(f"`classes_per_task` should be >= 1, but got classes_per_task={classes_per_task}.")
  heads = {task_name(t): nn.Dense(classes_per_task, name=task_name(t)) for t in range(num_tasks)}
  return Network(backbone=MLP(hidden=tuple(hidden)), heads=heads)


def init_params(net: Network, key: jax.Array, example: jax.Array) -> PyTree:
  """Initialises ``{"backbone": ..., "heads": {name: ...}}`` from one PRNG key."""
  kb, kh = jax.random.split(key)
  backbone = net.backbone.init(kb, example)["params"]
  features = net.backbone.apply({"params": backbone}, example)
  head_keys = jax.random.split(kh, len(net.heads))
  heads = {name: module.init(k, features)["params"]
           for (name, module), k in zip(net.heads.items(), head_keys)}
  return {"backbone": backbone, "heads": heads}


def features(net: Network, backbone_params: PyTree, x: jax.Array) -> jax.Array:
  return net.backbone.apply({"params": backbone_params}, x)


def head_logits(net: Network, head_params: dict[str, PyTree], feats: jax.Array,
                task_index: Any) -> jax.Array:
  """Logits of the head of ``task_index`` (an int or a traced int32 scalar)."""
  modules = list(net.heads.items())
  branches = [
      (lambda f, hp, name=name, m=m: m.apply({"params": hp[name]}, f)) for name, m in modules
  ]
  if len(branches) == 1:
    return branches[0](feats, head_params)
  index = jnp.clip(jnp.asarray(task_index, jnp.int32), 0, len(branches) - 1)
  return lax.switch(index, branches, feats, head_params)


def logits(net: Network, params: PyTree, x: jax.Array, task_index: Any) -> jax.Array:
  """``[B, C]`` logits of the whole network for the head of ``task_index``."""
  return head_logits(net, params["heads"], features(net, params["backbone"], x), task_index)


def backbone_logits_fn(net: Network, head_params: dict[str, PyTree], task_index: Any):
  """``logits_fn(backbone_params, x)`` for one task's head (what :func:`fisher_diagonal` weighs).

  The heads are closed over, so they never appear in the importance pytree.
  """
  return lambda backbone_params, x: head_logits(
      net, head_params, features(net, backbone_params, x), task_index)
