"""Continual-learning regularisers as small bundles of pure functions.

An :class:`Algorithm` says what is remembered between tasks (its *memory*, an immutable pytree
of fixed shape so that one compiled program serves every task), what penalty that memory adds to
the loss, and how the memory is updated after a task from the backbone parameters and their
importance. Adding an algorithm means writing one such constructor.

Hyperparameters live in :class:`Hyper` (arrays, so that sweeps can ``vmap`` over them).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ewc_jax import penalty as penalty_lib

PyTree = Any


class Hyper(NamedTuple):
  """Numeric hyperparameters (scalars or arrays with a leading sweep axis)."""
  lam: Any = 1.0
  p: Any = 2.0
  gamma: Any = 1.0
  lr: Any = 1e-3


class Algorithm(NamedTuple):
  """``init(backbone, num_tasks) -> memory``; ``penalty(backbone, memory, hyper, task_index)``;
  ``consolidate(memory, backbone, importance, task_index, hyper) -> memory``.

  ``needs_importance`` tells the runner whether to compute a Fisher after each task.
  """
  name: str
  init: Callable[[PyTree, int], PyTree]
  penalty: Callable[[PyTree, PyTree, Hyper, Any], jax.Array]
  consolidate: Callable[[PyTree, PyTree, PyTree, Any, Hyper], PyTree]
  needs_importance: bool


def finetune() -> Algorithm:
  """No regularisation (the lower bound)."""
  return Algorithm(
      name="finetune",
      init=lambda backbone, num_tasks: (),
      penalty=lambda backbone, memory, hyper, task_index: jnp.zeros((), jnp.float32),
      consolidate=lambda memory, backbone, importance, task_index, hyper: memory,
      needs_importance=False)


class EWCMemory(NamedTuple):
  """Separate anchors (stacked, one slot per previous task) and their p = 2 statistics."""
  anchors: penalty_lib.Anchor
  merged: penalty_lib.Merged


def _ewc_init(backbone: PyTree, num_tasks: int) -> EWCMemory:
  return EWCMemory(anchors=penalty_lib.empty_anchors(backbone, max(num_tasks - 1, 1)),
                   merged=penalty_lib.empty_merged(backbone))


def _ewc_consolidate(memory, backbone, importance, task_index, hyper):
  del hyper
  anchor = penalty_lib.Anchor(params=backbone, importance=importance)
  return EWCMemory(anchors=penalty_lib.set_anchor(memory.anchors, task_index, anchor),
                   merged=penalty_lib.merge_anchor(memory.merged, anchor))


def _standard_distance(backbone, memory: EWCMemory, p):
  """Σ_k Σ_i F_ki |θ_i − θ*_ki|^p; for p = 2 read off the merged statistics (same value and
  gradient, one pass instead of one per anchor)."""
  if isinstance(p, (int, float)):
    if p == 2:
      return penalty_lib.merged_distance(backbone, memory.merged)
    return penalty_lib.weighted_distance(backbone, memory.anchors, p)
  return lax.cond(jnp.asarray(p) == 2,
                  lambda: penalty_lib.merged_distance(backbone, memory.merged),
                  lambda: penalty_lib.weighted_distance(backbone, memory.anchors, p))


def ewc(penalty: str = "standard", p: float | None = None) -> Algorithm:
  """EWC with one anchor per previous task (stacked in ``num_tasks - 1`` slots).

  ``p``: a Python number fixes the exponent at trace time (p = 2 then reads the merged statistics
  only); ``None`` takes ``hyper.p`` at run time (for sweeps over p), choosing the branch with a
  ``lax.cond`` whose gradient keeps residuals of both branches (slower).

  ``penalty``:
    * ``"standard"``: (λ/2) Σ_k Σ_i F_ki |θ_i − θ*_ki|^p  (Kirkpatrick et al. 2017).
    * ``"seed"``: the seed reference's per-tensor p-norm penalty divided by the task id
      (see :func:`ewc_jax.penalty.seed_parity_loss`; λ is its ``parameter_change_reg_factor``).
    * ``"clarena"``: CLArena 1.1.0, 0.5 · λ · Σ_k Σ_i F_ki (θ_i − θ*_ki)² (p is ignored: 2).
  """
  if penalty == "standard":
    def pen(backbone, memory, hyper, task_index):
      return 0.5 * hyper.lam * _standard_distance(backbone, memory, hyper.p if p is None else p)
  elif penalty == "seed":
    def pen(backbone, memory, hyper, task_index):
      return penalty_lib.seed_parity_loss(backbone, memory.anchors, factor=hyper.lam,
                                          p=hyper.p if p is None else p,
                                          task_id=jnp.asarray(task_index) + 1)
  elif penalty == "clarena":
    def pen(backbone, memory, hyper, task_index):
      return 0.5 * hyper.lam * _standard_distance(backbone, memory, 2.0)
  else:
    raise ValueError(
        f"`penalty` must be one of standard, seed, clarena, but got penalty={penalty!r}.")
  return Algorithm(name="ewc" if penalty == "standard" else f"ewc_{penalty}",
                   init=_ewc_init, penalty=pen, consolidate=_ewc_consolidate,
                   needs_importance=True)
