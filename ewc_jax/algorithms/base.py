"""What every algorithm is: a bundle of pure functions over a fixed-shape memory."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax

PyTree = Any


class Hyper(NamedTuple):
  """Numeric hyperparameters (scalars, or arrays with a leading sweep axis under ``vmap``)."""
  lam: Any = 1.0
  p: Any = 2.0
  gamma: Any = 1.0
  lr: Any = 1e-3


# The Hyper fields read only by an algorithm's penalty and consolidation (never by the
# optimizer or the data order): configs differing only in these train their first task alike
# when the algorithm says so (``Algorithm.penalty_free_first_task``), and a sweep trains that
# task once per group of them (:mod:`ewc_jax.continual.sweep`).
PENALTY_ONLY = ("lam", "p", "gamma")


class InitFn(Protocol):
  """``(theta, num_tasks) -> memory``: the empty memory of the consolidated parameters θ, an
  immutable pytree whose shape does not depend on the task (one compiled program for all)."""

  def __call__(self, theta: PyTree, num_tasks: int) -> PyTree: ...


class PenaltyFn(Protocol):
  """``(theta, memory, hyper, task_index) -> scalar``: loss_reg, added to the task loss; pure and
  differentiable in θ (``task_index`` is an int32 array: the task being trained)."""

  def __call__(self, theta: PyTree, memory: PyTree, hyper: Hyper, task_index: Any) -> jax.Array: ...


class ConsolidateFn(Protocol):
  """``(memory, theta, importance, task_index, hyper) -> memory``: the memory after task
  ``task_index`` (θ*_t = ``theta``, F_t = ``importance``, a pytree like θ)."""

  def __call__(self, memory: PyTree, theta: PyTree, importance: PyTree, task_index: Any,
               hyper: Hyper) -> PyTree: ...


class Algorithm(NamedTuple):
  """A continual-learning regulariser: pure functions over a fixed-shape memory.

  Attributes:
    name: the ``--algo`` name.
    init: :class:`InitFn`.
    penalty: :class:`PenaltyFn`.
    consolidate: :class:`ConsolidateFn`, called after each task but the last.
    importance: what ``consolidate`` is given: ``"fisher"`` (the configured Fisher kind),
      ``"unit"`` (ones, e.g. L2) or ``None`` (nothing to consolidate).
    joint: train task t on the union of tasks 1..t (the upper bound).
    penalty_free_first_task: training the first task, evaluating it and the consolidation
      after it give the same bits whatever the :data:`PENALTY_ONLY` values (from ``init``'s
      empty memory the penalty and its gradient are exactly zero, and the first consolidation
      reads them at most times that empty memory), so a sweep may train the first task once for
      configs differing only in those. False (the default) for an algorithm that does not say.
  """
  name: str
  init: InitFn
  penalty: PenaltyFn
  consolidate: ConsolidateFn
  importance: str | None = "fisher"
  joint: bool = False
  penalty_free_first_task: bool = False
