"""Argument checks at the API boundary, in the reference's ``sanity_check`` style.

Every check names the argument, shows the value and says what is allowed. Checks run only on
concrete (non-traced) values, so the same functions stay usable under ``jit``/``vmap``/``grad``.
An array spread over the devices of several processes (``jax.distributed``), which no process
can read whole, is checked by a small reduction on its devices instead (every process calls the
function with the same global arrays, so every process gets the same answer; docs/multihost.md).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
  """True when ``x`` holds a value now (not a tracer inside ``jit``/``vmap``/``grad``)."""
  return not isinstance(x, jax.core.Tracer)


def host_readable(x: Any) -> bool:
  """False for a ``jax.Array`` this process cannot read whole: spread over the devices of several
  processes and not replicated (``np.asarray`` of it raises)."""
  return not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated


@jax.jit
def _first_negative_or_non_finite(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(count, value)``: how many entries of ``a`` are negative or non-finite, and the first
  one (row-major); the scalars come back replicated, readable by every process."""
  bad = jnp.logical_not(jnp.isfinite(a) & (a >= 0)).reshape(-1)
  return jnp.sum(bad), a.reshape(-1)[jnp.argmax(bad)]


def _scalar_values(name: str, value: Any) -> np.ndarray | None:
  if isinstance(value, (str, bytes)):
    raise ValueError(f"`{name}` must be a number, but got the string {value!r}: convert it, "
                     f"e.g. {name}=float({value!r}).")
  if not is_concrete(value):
    return None
  try:
    return np.asarray(value, dtype=np.float64).reshape(-1)
  except (TypeError, ValueError) as err:
    raise ValueError(f"`{name}` must be a number, got {value!r}.") from err


def check_positive(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless every concrete value of ``value`` is finite and > 0."""
  vals = _scalar_values(name, value)
  if vals is not None and not np.all(np.isfinite(vals) & (vals > 0)):
    bad = vals[~(np.isfinite(vals) & (vals > 0))][0]
    raise ValueError(f"`{name}` should be positive and finite, but got {name}={_fmt(bad)}.")


def check_non_negative(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless every concrete value of ``value`` is finite and >= 0."""
  vals = _scalar_values(name, value)
  if vals is not None and not np.all(np.isfinite(vals) & (vals >= 0)):
    bad = vals[~(np.isfinite(vals) & (vals >= 0))][0]
    raise ValueError(f"`{name}` should be >= 0 and finite, but got {name}={_fmt(bad)}.")


def non_negative_or_nan(value: Any) -> Any:
  """``value`` as it is when concrete (:func:`check_non_negative` checks it); a traced one (under
  ``jit``/``vmap``, where no check can raise) as NaN wherever it is negative or non-finite, so a
  bad λ makes the penalty and its gradient NaN -- a loss that shows it -- instead of a silently
  negative penalty. Valid values pass through unchanged, bit for bit.

  >>> import jax
  >>> float(jax.jit(non_negative_or_nan)(-1.0)), float(jax.jit(non_negative_or_nan)(2.0))
  (nan, 2.0)
  """
  return _nan_unless(value, lambda v: v >= 0)


def positive_or_nan(value: Any) -> Any:
  """As :func:`non_negative_or_nan` for a value that must be > 0 (:func:`check_positive`)."""
  return _nan_unless(value, lambda v: v > 0)


def _nan_unless(value: Any, ok) -> Any:
  """``value`` when concrete; traced, NaN wherever it is non-finite or not ``ok``."""
  if is_concrete(value):
    return value
  v = jnp.asarray(value)
  return jnp.where(jnp.isfinite(v) & ok(v), v, jnp.nan)


def check_unit_interval(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless every concrete value lies in (0, 1]."""
  vals = _scalar_values(name, value)
  if vals is not None and not np.all((vals > 0) & (vals <= 1)):
    bad = vals[~((vals > 0) & (vals <= 1))][0]
    raise ValueError(f"`{name}` should be in (0, 1], but got {name}={_fmt(bad)}.")


def check_importance(name: str, importance: Any) -> None:
  """Raises ``ValueError`` when a concrete importance pytree holds a negative or non-finite entry."""
  leaves = jax.tree_util.tree_flatten_with_path(importance)[0]
  for path, leaf in leaves:
    if not is_concrete(leaf):
      return
    if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float)):
      continue  # e.g. jax.ShapeDtypeStruct (shapes only) or a placeholder
    dtype = np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_):
      continue
    if host_readable(leaf):
      arr = np.asarray(leaf)
      bad = arr[~(np.isfinite(arr) & (arr >= 0))].reshape(-1)
      first = bad[0] if bad.size else None
    else:
      with jax.ensure_compile_time_eval():  # now, also while a jit traces (a closed-over leaf)
        count, value = _first_negative_or_non_finite(leaf)
      first = np.asarray(value) if int(count) else None
    if first is not None:
      raise ValueError(
          f"`{name}` must be finite and >= 0 everywhere, but leaf "
          f"{jax.tree_util.keystr(path)} has value {_fmt(first)}.")


def check_same_structure(name: str, reference: Any, other: Any, reference_name: str = "params") -> None:
  """Raises ``ValueError`` naming the first leaf path where ``other`` differs from ``reference``.

  Compares tree structure (paths) and every leaf's shape.
  """
  ref = jax.tree_util.tree_flatten_with_path(reference)[0]
  oth = jax.tree_util.tree_flatten_with_path(other)[0]
  ref_paths = [jax.tree_util.keystr(p) for p, _ in ref]
  oth_paths = [jax.tree_util.keystr(p) for p, _ in oth]
  for i, path in enumerate(ref_paths):
    if i >= len(oth_paths) or oth_paths[i] != path:
      if path not in oth_paths:
        raise ValueError(
            f"`{name}` does not match `{reference_name}`: leaf {path} is missing from `{name}`.")
      extra = oth_paths[i]
      raise ValueError(
          f"`{name}` does not match `{reference_name}`: unexpected leaf {extra} in `{name}`.")
    ref_shape, oth_shape = np.shape(ref[i][1]), np.shape(oth[i][1])
    if ref_shape != oth_shape:
      raise ValueError(
          f"`{name}` does not match `{reference_name}`: leaf {path} has shape {oth_shape} in "
          f"`{name}` but {ref_shape} in `{reference_name}`.")
  if len(oth_paths) > len(ref_paths):
    raise ValueError(
        f"`{name}` does not match `{reference_name}`: unexpected leaf "
        f"{oth_paths[len(ref_paths)]} in `{name}`.")


def _fmt(x: float) -> str:
  x = float(x)
  if math.isnan(x) or math.isinf(x):
    return str(x)
  return f"{x:g}"
