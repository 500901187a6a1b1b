r"""A random subset of a task's rows, as a 0/1 row mask (e.g. a Fisher on n examples).

The Fisher of a task may be estimated on n of its N training examples instead of all of them
(van de Ven 2025's EXACT(n=500): the first n of a shuffled loader). :func:`random_rows` keeps
n of the rows a mask marks valid, uniformly at random without replacement, drawn from a PRNG key:

.. math::  u_i \sim U[0, 1)\ \text{i.i.d.},\quad
   \text{keep}_i = \text{valid}_i \wedge \big(\operatorname{rank}_{j \in \text{valid}}(u)_i < n\big)

so exactly ``min(n, Σ valid)`` rows are kept, each n-subset of the valid rows equally likely.
Padded rows (``valid_i = 0``) are never kept. Pure and traceable: ``n`` may be a Python int
or a traced integer, ``valid`` a traced mask (one compiled program serves every task).

    >>> import jax, jax.numpy as jnp
    >>> from ewc_jax import subset
    >>> valid = jnp.arange(8) < 6                     # 6 real rows, 2 padded
    >>> keep = subset.random_rows(jax.random.key(0), valid, 4)
    >>> int(keep.sum()), bool(jnp.all(valid | ~keep))  # 4 rows, none of them padding
    (4, True)
    >>> int(subset.random_rows(jax.random.key(0), valid, 100).sum())  # n >= valid rows: all
    6

Reference: van de Ven, 2025. On the computation of the Fisher Information in continual
learning. ICLR Blogposts (arXiv:2502.11756).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_rows(key: jax.Array, valid: jax.Array, n) -> jax.Array:
  """A ``[N]`` bool mask of ``min(n, valid.sum())`` rows of ``valid`` (``[N]`` bool or 0/1),
  drawn uniformly without replacement with ``key``."""
  valid = jnp.asarray(valid).astype(bool)
  if valid.ndim != 1:
    raise ValueError(f"`valid` must be a [N] row mask, got shape {tuple(valid.shape)}.")
  if isinstance(n, int) and (isinstance(n, bool) or n < 1):
    raise ValueError(f"`n` must be an integer >= 1, got n={n!r}.")
  scores = jnp.where(valid, jax.random.uniform(key, valid.shape), jnp.inf)
  ranks = jnp.argsort(jnp.argsort(scores))
  return valid & (ranks < n)


__all__ = ["random_rows"]
