"""Continual-learning algorithms: one small module each, registered by ``--algo`` name.

An :class:`Algorithm` says what is remembered between tasks (its *memory*, an immutable pytree of
fixed shape), the penalty it adds to the loss and how the memory is updated after a task. To add
one: write a module with a constructor returning an :class:`Algorithm` and register it below.
"""

from __future__ import annotations

from ewc_jax import errors
from ewc_jax.algorithms.base import PENALTY_ONLY, Algorithm, Hyper
from ewc_jax.algorithms.ewc import EWCMemory, PENALTIES, ewc
from ewc_jax.algorithms.ewc_merged import ewc_merged
from ewc_jax.algorithms.finetune import finetune
from ewc_jax.algorithms.joint import joint
from ewc_jax.algorithms.l2 import l2
from ewc_jax.algorithms.online_ewc import online_ewc

REGISTRY = {
    "finetune": finetune,
    "joint": joint,
    "l2": l2,
    "ewc": ewc,
    "ewc_merged": ewc_merged,
    "online_ewc": online_ewc,
}
NAMES = tuple(REGISTRY)


def make(name: str, *, penalty: str = "standard", p: float | None = None) -> Algorithm:
  """The algorithm registered as ``name``; ``penalty`` applies to ``ewc`` only.

  The one check of these settings (:meth:`ewc_jax.continual.Config.validate` builds the
  algorithm to check them): the errors are :class:`ewc_jax.errors.SettingError` naming
  ``algo``, ``penalty`` or ``p``."""
  if name not in REGISTRY:
    raise errors.SettingError.invalid("algo", name, "one of " + ", ".join(NAMES))
  if penalty != "standard" and name != "ewc":
    raise errors.SettingError(lambda n: f"{n('penalty')}={penalty!r} is invalid: expected "
                              f"standard unless {n('algo')}=ewc.")
  if name == "ewc":
    return ewc(penalty, p=p)
  return REGISTRY[name](p=p)


__all__ = ["Algorithm", "EWCMemory", "Hyper", "NAMES", "PENALTIES", "PENALTY_ONLY", "REGISTRY", "ewc",
           "ewc_merged", "finetune", "joint", "l2", "make", "online_ewc"]
