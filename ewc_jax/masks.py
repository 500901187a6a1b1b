"""Leaf masks: which parameter leaves EWC weighs and penalises, in the manner of ``optax.masked``.

A ``leaf_mask`` is

* ``None``: every leaf;
* a pytree of Python/NumPy bools with the structure of ``params`` or a *prefix* of it (one bool
  for a whole sub-tree, e.g. ``{"backbone": True, "head": False}``); matched by key path, so a
  plain dict mask works for an ``nnx.State`` of the same keys;
* a callable ``mask_fn(params) -> such a pytree`` (exactly ``optax.masked``'s convention);
  :func:`path_mask` turns a predicate on key paths into one.

Masks are static: they choose which leaves a compiled program touches.

Example::

  >>> import jax.numpy as jnp
  >>> params = {"backbone": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2), "b": jnp.ones(1)}}
  >>> resolve({"backbone": True, "head": False}, params)
  (True, False, False)
  >>> resolve(path_mask(lambda path, leaf: path[-1] != "b"), params)
  (True, False, True)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

PyTree = Any
LeafMask = Any  # None | pytree of bools | Callable[[PyTree], pytree of bools]


def _key_name(k) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def key_names(path) -> tuple:
  """A key path as plain names: ``(DictKey('a'), GetAttrKey('b'), SequenceKey(0)) -> ('a', 'b', 0)``."""
  return tuple(_key_name(k) for k in path)


def path_mask(predicate: Callable[[tuple, Any], bool]) -> Callable[[PyTree], PyTree]:
  """An ``optax.masked``-style ``mask_fn`` from ``predicate(path, leaf) -> bool``.

  ``path`` is the tuple of key names, e.g. ``("params", "Dense_0", "kernel")``.
  """
  def mask_fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: bool(predicate(key_names(path), leaf)), params)
  return mask_fn


def resolve(leaf_mask: LeafMask, params: PyTree, name: str = "leaf_mask") -> tuple[bool, ...]:
  """One static bool per leaf of ``params`` (in ``jax.tree.leaves`` order).

  Raises:
    ValueError: a mask entry that is not a concrete bool, matches no leaf, or a leaf that no
      mask entry covers (names the path).
  """
  param_paths = [key_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  if leaf_mask is None:
    return (True,) * len(param_paths)
  if callable(leaf_mask):
    leaf_mask = leaf_mask(params)
  entries = {}
  for path, value in jax.tree_util.tree_flatten_with_path(leaf_mask)[0]:
    where = jax.tree_util.keystr(path) or "(the root)"
    if isinstance(value, jax.core.Tracer):
      raise ValueError(f"`{name}` must hold static bools, but entry {where} is traced "
                       f"(a mask chooses leaves at trace time; build it outside jit).")
    arr = np.asarray(value)
    if arr.shape != () or arr.dtype != np.bool_:
      raise ValueError(f"`{name}` must hold one bool per leaf or sub-tree, but entry {where} "
                       f"is {value!r}.")
    entries[key_names(path)] = bool(arr)
  out, used = [], set()
  for path in param_paths:
    hit = next((path[:k] for k in range(len(path), -1, -1) if path[:k] in entries), None)
    if hit is None:
      raise ValueError(f"`{name}` has no entry for the params leaf {_show(path)}; give one bool "
                       f"per leaf or per sub-tree (a prefix of params).")
    used.add(hit)
    out.append(entries[hit])
  unused = [p for p in entries if p not in used]
  if unused:
    raise ValueError(f"`{name}` entry {_show(unused[0])} matches no leaf of params.")
  return tuple(out)


def _show(names: tuple) -> str:
  return "".join(f"[{n!r}]" for n in names) or "(the root)"
