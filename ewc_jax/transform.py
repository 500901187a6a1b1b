r"""The p = 2 EWC penalty as an optax ``GradientTransformation``, for loops without a loss hook.

:func:`add_ewc_gradient` adds the penalty's gradient to the incoming gradients:

.. math::  g \leftarrow g + \nabla_\theta \tfrac{\lambda}{2} \sum_k \sum_i F_{k,i}
           (\theta_i - \theta^*_{k,i})^2 = g + \lambda \sum_k F_k \circ (\theta - \theta^*_k)

Chain it *before* the optimiser (``optax.chain(add_ewc_gradient(lam=...), optax.adam(1e-3))``),
exactly like ``optax.add_decayed_weights`` for weight decay, so the optimiser sees the gradient
of ``loss + ewc_loss``. The result equals differentiating :func:`ewc_jax.ewc_loss`.

**Anchors and λ at update time.** The anchors (and λ) may be given when the transformation is
built (fixed), or -- the way to compile one train step for every task -- passed to ``update`` as
optax extra arguments, ``tx.update(g, state, params, ewc_anchors=anchors, ewc_lam=lam)``
(``optax.chain`` forwards them): arguments of your jitted step, so a new task's anchors need no
new transformation, optimiser state or compile. Keep their shapes fixed across tasks with a
stacked anchor of K slots (``empty_anchors`` + ``set_anchor``); empty slots contribute nothing.

Limits: p = 2 only; it never computes the penalty's *value* (call :func:`ewc_jax.ewc_loss` for
that); ``update`` needs ``params``; its state is empty.

Example::

  >>> import jax.numpy as jnp, optax
  >>> from ewc_jax import Anchor
  >>> anchor = Anchor(params={"w": jnp.zeros(2)}, importance={"w": jnp.array([1.0, 2.0])})
  >>> tx = add_ewc_gradient((anchor,), lam=0.5)
  >>> g, _ = tx.update({"w": jnp.ones(2)}, tx.init(None), {"w": jnp.ones(2)})
  >>> g["w"].tolist()                                     # 1 + 0.5 * F * (1 - 0)
  [1.5, 2.0]
  >>> tx = optax.chain(add_ewc_gradient(), optax.sgd(1.0))   # anchors given at update time
  >>> u, _ = tx.update({"w": jnp.zeros(2)}, tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)},
  ...                  ewc_anchors=(anchor,), ewc_lam=2.0)
  >>> u["w"].tolist()                                     # -(2 * F * 1)
  [-2.0, -4.0]

References:
  Kirkpatrick et al., 2017. Overcoming catastrophic forgetting in neural networks. PNAS.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ewc_jax import masks as masks_lib
from ewc_jax import misuse
from ewc_jax import penalty
from ewc_jax import validation
from ewc_jax import variables


def add_ewc_gradient(anchors: penalty.Anchors | None = None, *, lam: Any = None,
                     mask: masks_lib.LeafMask = None,
                     leaf_mask: masks_lib.LeafMask = None
                     ) -> optax.GradientTransformationExtraArgs:
  """``g + λ Σ_k F_k (θ − θ*_k)`` on the masked leaves (see the module docstring).

  Args:
    anchors: as in :func:`ewc_jax.ewc_loss` (a sequence of Anchor or one stacked Anchor); None:
      only those given to ``update`` as ``ewc_anchors=`` (none given: the identity).
    lam: λ >= 0 (0: the identity), checked when concrete (a traced negative or non-finite λ
      makes the updates NaN); ``update(..., ewc_lam=)`` overrides it.
      Required, here or at every update.
    mask: which leaves are penalised, as in ``optax.add_decayed_weights`` (a bool pytree, a
      prefix of one, or a function of params); ``leaf_mask`` is the same (the library's name).
  """
  if mask is not None and leaf_mask is not None:
    raise ValueError("give `mask` or `leaf_mask` (the same thing), not both.")
  leaf_mask = mask if mask is not None else leaf_mask
  if lam is not None:
    misuse.check_number("lam", lam)
    validation.check_non_negative("lam", lam)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, ewc_anchors=None, ewc_lam=None, **extra):
    del extra
    if params is None:
      raise ValueError("add_ewc_gradient needs `params`: call tx.update(grads, state, params).")
    use = anchors if ewc_anchors is None else ewc_anchors
    strength = lam if ewc_lam is None else ewc_lam
    if use is None:
      return updates, state
    if strength is None:
      raise ValueError("add_ewc_gradient needs λ: add_ewc_gradient(lam=...) or "
                       "tx.update(..., ewc_lam=...).")
    misuse.check_number("ewc_lam" if ewc_lam is not None else "lam", strength)
    validation.check_non_negative("ewc_lam" if ewc_lam is not None else "lam", strength)
    strength = validation.non_negative_or_nan(strength)  # traced and bad: NaN updates
    misuse.check_params(params, "params")
    plain = variables.as_arrays(params)
    name = "ewc_anchors" if ewc_anchors is not None else "anchors"
    stacked = penalty._as_stacked(plain, use, name)  # pylint: disable=protected-access
    if stacked is None:
      return updates, state
    on = masks_lib.resolve(leaf_mask, plain, "mask")
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
        g = (g.astype(jnp.float32) + strength * pull).astype(jnp.result_type(g))
      out.append(g)
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
