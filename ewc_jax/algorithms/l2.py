r"""L2 regularisation towards every previous solution: EWC with unit importance.

Penalty (λ/2) Σ_k Σ_i (θ_i − θ*_ki)^p, i.e. :mod:`ewc` with F = 1 (no Fisher pass).
"""

from ewc_jax.algorithms.base import Algorithm
from ewc_jax.algorithms.ewc import ewc


def l2(p: float | None = None) -> Algorithm:
  return ewc("standard", p=p)._replace(name="l2", importance="unit")
