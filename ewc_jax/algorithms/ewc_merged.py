r"""EWC with merged anchors (p = 2 only): memory O(1) in the number of tasks.

Σ_k F_k (θ − θ*_k)² = A (θ − m)² + c with A = Σ_k F_k, m = Σ_k F_k θ*_k / A (see
:class:`ewc_jax.penalty.Merged`): exactly the value and gradient of :mod:`ewc` with p = 2, while
keeping two pytrees and a scalar instead of one anchor per task.
"""

from __future__ import annotations

from ewc_jax import errors
from ewc_jax import penalty as penalty_lib
from ewc_jax.algorithms.base import Algorithm


def ewc_merged(p: float | None = 2.0) -> Algorithm:
  """EWC with merged anchors; ``p`` must be 2 (or None: ``hyper.p``, which must then be 2)."""
  if p is not None and p != 2:
    raise errors.SettingError(lambda n: f"{n('p')}={p!r} is invalid: expected 2 with "
                              f"{n('algo')}=ewc_merged (a merged quadratic).")
  return Algorithm(
      name="ewc_merged",
      init=lambda backbone, num_tasks: penalty_lib.empty_merged(backbone),
      penalty=lambda backbone, memory, hyper, task_index: (
          penalty_lib.ewc_penalty(backbone, lam=hyper.lam, p=2.0, merged=memory)),
      consolidate=lambda memory, backbone, importance, task_index, hyper: (
          penalty_lib.merge_anchor(memory, penalty_lib.Anchor(backbone, importance))),
      importance="fisher", penalty_free_first_task=True)
