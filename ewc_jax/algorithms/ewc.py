r"""EWC with one anchor per previous task (Kirkpatrick et al. 2017).

Memory: the anchors stacked in ``num_tasks - 1`` slots (free slots hold zero importance and add
exactly nothing) plus their p = 2 sufficient statistics (:class:`ewc_jax.penalty.Merged`).

``penalty``:
  * ``"standard"``: (λ/2) Σ_k Σ_i F_ki |θ_i − θ*_ki|^p.
  * ``"seed"``: the seed reference's per-tensor p-norm penalty divided by the task id
    (:func:`ewc_jax.penalty.seed_parity_loss`; λ is its ``parameter_change_reg_factor``).
  * ``"clarena"``: CLArena 1.1.0, 0.5 · λ · Σ_k Σ_i F_ki (θ_i − θ*_ki)² (p is ignored: 2).

``p``: a Python number fixes the exponent at trace time; p = 2 then reads the merged statistics
(same value and gradient, one pass instead of one per anchor). ``None`` takes ``hyper.p`` at run
time (sweeps over p), choosing with :func:`ewc_jax.penalty.by_exponent`. Every penalty is
:func:`ewc_jax.penalty.ewc_penalty` (λ/2 and the p = 2 choice written there once) but ``seed``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from ewc_jax import errors
from ewc_jax import penalty as penalty_lib
from ewc_jax.algorithms.base import Algorithm

PENALTIES = ("standard", "seed", "clarena")


class EWCMemory(NamedTuple):
  """What EWC remembers: ``anchors``, the (θ*_k, F_k) of every previous task stacked in
  ``num_tasks - 1`` slots (free slots: zero importance), and ``merged``, their p = 2 sufficient
  statistics (A, m, c of :class:`ewc_jax.penalty.Merged`, read when p = 2)."""
  anchors: penalty_lib.Anchor
  merged: penalty_lib.Merged


def _init(backbone, num_tasks: int) -> EWCMemory:
  return EWCMemory(anchors=penalty_lib.empty_anchors(backbone, max(num_tasks - 1, 1)),
                   merged=penalty_lib.empty_merged(backbone))


def _consolidate(memory, backbone, importance, task_index, hyper):
  del hyper
  anchor = penalty_lib.Anchor(params=backbone, importance=importance)
  return EWCMemory(anchors=penalty_lib.set_anchor(memory.anchors, task_index, anchor),
                   merged=penalty_lib.merge_anchor(memory.merged, anchor))


def ewc(penalty: str = "standard", p: float | None = None) -> Algorithm:
  """EWC with the ``penalty`` of the module docstring and exponent ``p`` (None: ``hyper.p``)."""
  if penalty == "standard":
    def pen(backbone, memory, hyper, task_index):
      return penalty_lib.ewc_penalty(backbone, lam=hyper.lam, p=hyper.p if p is None else p,
                                     anchors=memory.anchors, merged=memory.merged)
  elif penalty == "seed":
    def pen(backbone, memory, hyper, task_index):
      return penalty_lib.seed_parity_loss(backbone, memory.anchors, factor=hyper.lam,
                                          p=hyper.p if p is None else p,
                                          task_id=jnp.asarray(task_index) + 1)
  elif penalty == "clarena":
    def pen(backbone, memory, hyper, task_index):
      return penalty_lib.ewc_penalty(backbone, lam=hyper.lam, p=2.0, anchors=memory.anchors,
                                     merged=memory.merged)
  else:
    raise errors.SettingError.invalid("penalty", penalty, "one of " + ", ".join(PENALTIES))
  return Algorithm(name="ewc" if penalty == "standard" else f"ewc_{penalty}",
                   init=_init, penalty=pen, consolidate=_consolidate, importance="fisher",
                   penalty_free_first_task=True)
