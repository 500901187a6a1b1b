"""What every algorithm is: a bundle of pure functions over a fixed-shape memory."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

PyTree = Any


class Hyper(NamedTuple):
  """Numeric hyperparameters (scalars, or arrays with a leading sweep axis under ``vmap``)."""
  lam: Any = 1.0
  p: Any = 2.0
  gamma: Any = 1.0
  lr: Any = 1e-3


class Algorithm(NamedTuple):
  """A continual-learning regulariser.

  Attributes:
    name: the ``--algo`` name.
    init: ``(backbone, num_tasks) -> memory``, an immutable pytree of fixed shape (so one
      compiled program serves every task).
    penalty: ``(backbone, memory, hyper, task_index) -> scalar`` added to the loss.
    consolidate: ``(memory, backbone, importance, task_index, hyper) -> memory`` after a task.
    importance: what ``consolidate`` is given: ``"fisher"`` (the configured Fisher kind),
      ``"unit"`` (ones, e.g. L2) or ``None`` (nothing to consolidate).
    joint: train task t on the union of tasks 1..t (the upper bound).
  """
  name: str
  init: Callable[[PyTree, int], PyTree]
  penalty: Callable[[PyTree, PyTree, Hyper, Any], jax.Array]
  consolidate: Callable[[PyTree, PyTree, PyTree, Any, Hyper], PyTree]
  importance: str | None = "fisher"
  joint: bool = False
