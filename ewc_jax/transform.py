r"""The p = 2 EWC penalty as an optax ``GradientTransformation``, for loops without a loss hook.

:func:`add_ewc_gradient` adds the penalty's gradient to the incoming gradients:

.. math::  g \leftarrow g + \nabla_\theta \tfrac{\lambda}{2} \sum_k \sum_i F_{k,i}
           (\theta_i - \theta^*_{k,i})^2 = g + \lambda \sum_k F_k \circ (\theta - \theta^*_k)

Chain it *before* the optimiser (``optax.chain(add_ewc_gradient(anchors, lam=...), optax.adam(
1e-3))``), exactly like ``optax.add_decayed_weights`` for weight decay, so the optimiser sees the
gradient of ``loss + ewc_loss``. The result equals differentiating :func:`ewc_jax.ewc_loss`.

Limits: p = 2 only; it never computes the penalty's *value* (no ``loss_reg`` to report: call
:func:`ewc_jax.ewc_loss` for that); the anchors are fixed when the transformation is built (after
each task build a new one, and a new optimiser state is not needed: its state is empty);
``update`` needs ``params``.

Example::

  >>> import jax.numpy as jnp, optax
  >>> from ewc_jax import Anchor
  >>> anchor = Anchor(params={"w": jnp.zeros(2)}, importance={"w": jnp.array([1.0, 2.0])})
  >>> tx = add_ewc_gradient((anchor,), lam=0.5)
  >>> g, _ = tx.update({"w": jnp.zeros(2)}, tx.init(None), {"w": jnp.ones(2)})
  >>> g["w"].tolist()                                     # 0.5 * F * (1 - 0)
  [0.5, 1.0]

References:
  Kirkpatrick et al., 2017. Overcoming catastrophic forgetting in neural networks. PNAS.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ewc_jax import masks as masks_lib
from ewc_jax import penalty
from ewc_jax import validation
from ewc_jax import variables


def add_ewc_gradient(anchors: penalty.Anchors, *, lam: Any,
                     leaf_mask: masks_lib.LeafMask = None) -> optax.GradientTransformation:
  """``g + λ Σ_k F_k (θ − θ*_k)`` on the masked leaves (see the module docstring).

  Args:
    anchors: as in :func:`ewc_jax.ewc_loss` (a sequence of Anchor or one stacked Anchor).
    lam: λ >= 0 (0: the identity); checked when concrete.
    leaf_mask: which leaves are penalised (``ewc_jax.masks``).
  """
  validation.check_non_negative("lam", lam)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_ewc_gradient needs `params`: call tx.update(grads, state, params).")
    plain = variables.as_arrays(params)
    stacked = penalty._as_stacked(plain, anchors)  # pylint: disable=protected-access
    if stacked is None:
      return updates, state
    on = masks_lib.resolve(leaf_mask, plain)
    leaves, treedef = jax.tree.flatten(updates)
    if len(leaves) != len(on):
      raise ValueError(f"`updates` has {len(leaves)} leaves but `params` has {len(on)}.")
    out = []
    for g, theta, ref, imp, m in zip(leaves, jax.tree.leaves(plain), stacked.params,
                                     stacked.importance, on):
      if m:
        theta = theta.astype(jnp.float32)
        pull = sum(imp[k].astype(jnp.float32) * (theta - ref[k].astype(jnp.float32))
                   for k in range(ref.shape[0]))
        g = (g.astype(jnp.float32) + lam * pull).astype(jnp.result_type(g))
      out.append(g)
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformation(init_fn, update_fn)
