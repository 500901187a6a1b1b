r"""Online EWC (Schwarz et al. 2018, "Progress & Compress"): one anchor, decayed importance.

After task t:  F̃ ← γ F̃ + F_t,  θ* ← θ*_t;  penalty (λ/2) Σ_i F̃_i |θ_i − θ*_i|^p, γ ∈ (0, 1].
The decay is applied once, when consolidating (not again inside the loss).
"""

from __future__ import annotations

import jax

from ewc_jax import penalty as penalty_lib
from ewc_jax.algorithms.base import Algorithm


def _init(backbone, num_tasks):
  del num_tasks
  return penalty_lib.empty_anchors(backbone, 1)


def _consolidate(memory, backbone, importance, task_index, hyper):
  del task_index
  decayed = jax.tree.map(lambda f_old, f_new: hyper.gamma * f_old[0] + f_new,
                         memory.importance, importance)
  return penalty_lib.stack_anchors([penalty_lib.Anchor(backbone, decayed)])


def online_ewc(p: float | None = None) -> Algorithm:

  def pen(backbone, memory, hyper, task_index):
    return penalty_lib.ewc_penalty(backbone, lam=hyper.lam, p=hyper.p if p is None else p,
                                   anchors=memory)
  return Algorithm(name="online_ewc", init=_init, penalty=pen, consolidate=_consolidate,
                   importance="fisher", penalty_free_first_task=True)  # γ · 0 + F_1 = F_1


__all__ = ["online_ewc"]
