"""Plain arrays out of Flax NNX state: :func:`as_arrays` replaces every ``nnx.Variable`` by its value.

``nnx.split(model, nnx.Param)`` and ``nnx.state(model)`` return the model's *live* Variables: the
optimiser later writes new values into those very objects. A frozen copy θ* (an EWC anchor) that
kept them would move with the model, and the penalty Σ F (θ − θ*)² would stay exactly 0 (EWC would
silently become finetuning). JAX arrays are immutable, so holding the *values* is a true copy.

The result keeps every container of the input (an ``nnx.State`` stays an ``nnx.State``, a dict a
dict) and drops only the Variable wrappers, so a tree built from ``nnx.state(model, nnx.Param)``
inside a loss and one built from it after a task have the same structure. Trees without NNX
Variables are returned unchanged; ``flax.nnx`` is never imported here (if it was not imported,
no Variable can exist).

Example::

  >>> import jax.numpy as jnp
  >>> as_arrays({"w": jnp.ones(2)})["w"].tolist()
  [1.0, 1.0]
"""

from __future__ import annotations

import sys
from typing import Any

import jax

PyTree = Any


def _variable_type():
  nnx = sys.modules.get("flax.nnx")
  return None if nnx is None else nnx.Variable


def has_variables(tree: PyTree) -> bool:
  """True when ``tree`` holds at least one ``nnx.Variable``."""
  var = _variable_type()
  if var is None:
    return False
  return any(isinstance(x, var) for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, var)))


def as_arrays(tree: PyTree) -> PyTree:
  """``tree`` with each ``nnx.Variable`` replaced by its value (an immutable array): see above."""
  var = _variable_type()
  if var is None or not has_variables(tree):
    return tree
  return jax.tree.map(lambda x: x.get_value() if isinstance(x, var) else x, tree,
                      is_leaf=lambda x: isinstance(x, var))
