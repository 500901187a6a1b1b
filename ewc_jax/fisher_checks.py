"""The checked arguments of the Fisher estimators (``fisher``, ``fisher_stream``).

One home for what a Fisher call accepts: the settings (``kind``, ``method``, ``reduction``,
``batch_size``), the parameters and inputs traced once (:class:`Setup`), the categorical targets
(labels in ``[0, C)``, label masks, row weights: :class:`Targets`) and the misuse found only by
the compiled program (probabilities for logits, labels out of range: :func:`raise_flags`).
Every error names the argument and the value it got.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import fisher_program as prog
from ewc_jax import masks as masks_lib
from ewc_jax import misuse
from ewc_jax import validation
from ewc_jax import variables

PyTree = Any

KINDS = ("empirical", "true", "sampled", "predicted", "batch_squared")
METHODS = ("auto", "vmap")
REDUCTIONS = ("sum", "mean")
LABELLED_KINDS = ("empirical", "batch_squared")


class Setup(NamedTuple):
  """A Fisher call's function traced for one example, its weighed leaves and its inputs."""
  traced: prog.Traced
  active: tuple
  inputs: PyTree
  n: int


class Targets(NamedTuple):
  """A categorical call's checked targets: ``labels``, ``label_mask`` and row ``weights``
  (each None when not given)."""
  labels: Any
  label_mask: Any
  weights: Any


def check_settings(kind: str, method: str, reduction: str, batch_size: Any = 1) -> None:
  """Refuses a ``kind``, ``method`` or ``reduction`` not listed, or a ``batch_size`` not > 0."""
  if kind not in KINDS:
    raise ValueError(f"`kind` must be one of {', '.join(KINDS)}, but got kind={kind!r}.")
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {', '.join(METHODS)}, but got method={method!r}.")
  if reduction not in REDUCTIONS:
    raise ValueError(f"`reduction` must be one of {', '.join(REDUCTIONS)}, but got "
                     f"reduction={reduction!r}.")
  if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
      or batch_size <= 0):
    raise ValueError(f"`batch_size` should be a positive integer, but got "
                     f"batch_size={batch_size!r}.")


def setup_call(fn: Callable, params: PyTree, inputs: PyTree, leaf_mask, what: str) -> Setup:
  """``fn`` (named ``what`` in errors) traced on the first example of the checked ``inputs``,
  with the float leaves of ``params`` that ``leaf_mask`` weighs."""
  misuse.check_params(params, "params")
  plain = variables.as_arrays(params)
  active = masks_lib.resolve(leaf_mask, plain)
  for (path, leaf), on in zip(jax.tree_util.tree_flatten_with_path(plain)[0], active):
    if on and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(
          f"`params` leaf {jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}: only "
          f"float leaves can be weighed (for NNX pass nnx.state(model, nnx.Param), not "
          f"nnx.state(model), which also holds RNG keys and counters; or exclude the leaf with "
          f"leaf_mask).")
  inputs, n = as_inputs(inputs)
  example = jax.tree.map(lambda a: a[0], inputs)
  traced = prog.trace(fn, params, example, plain, what)
  return Setup(traced, tuple(active), inputs, n)


def as_inputs(inputs: PyTree, name: str = "inputs") -> tuple[PyTree, int]:
  """``inputs`` as a pytree of arrays with one common leading axis N > 0: ``(inputs, N)``."""
  if isinstance(inputs, (np.ndarray, jax.Array)) or np.isscalar(inputs):
    inputs = jnp.asarray(inputs)
  flat = jax.tree_util.tree_flatten_with_path(inputs)[0]
  if not flat:
    raise ValueError(f"`{name}` must be a non-empty [N, ...] array or a pytree of them, got "
                     f"{type(inputs).__name__} with no array leaves.")
  n = None
  for path, leaf in flat:
    shape = np.shape(leaf)
    where = f"leaf {jax.tree_util.keystr(path)} of `{name}`" if path else f"`{name}`"
    if len(shape) < 1 or shape[0] == 0:
      raise ValueError(f"{where} must be a non-empty [N, ...] array, got shape {shape}.")
    if n is None:
      n = shape[0]
    elif shape[0] != n:
      raise ValueError(f"every leaf of `{name}` must have the same leading size N, but {where} "
                       f"has {shape[0]} and the first has {n}.")
  return jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jnp.asarray(a), inputs), n


def categorical_targets(traced: prog.Traced, n: int, labels, label_mask, kind: str):
  """Checked ``(labels or None, label_mask or None, C)`` for ``[*P, C]`` single outputs."""
  out = traced.out_shape
  if len(out) < 1:
    raise ValueError(
        "`logits_fn` must return [B, C] logits (batch axis first; [B, ..., C] for token-level "
        "labels), but for a batch of 1 example it returned shape (1,) (a 1-D output: keep the "
        "batch axis, and give a binary task 2 logits).")
  positions, c = tuple(out[:-1]), int(out[-1])
  want = (n,) + positions
  if labels is None:
    if kind in LABELLED_KINDS:
      raise ValueError(f"`labels` are required for kind={kind!r}.")
  else:
    labels = labels if isinstance(labels, jax.Array) else jnp.asarray(labels)
    if tuple(labels.shape) != want:
      raise ValueError(
          f"`labels` must have shape {want} to match `inputs` (N={n}) and the logits "
          f"{('[B, ' + ', '.join(map(str, positions)) + ', C]') if positions else '[B, C]'} of "
          f"`logits_fn`, got {tuple(labels.shape)}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"`labels` must be integer class indices in [0, {c}), but got dtype "
                       f"{labels.dtype}.")
  if label_mask is not None:
    label_mask = label_mask if isinstance(label_mask, jax.Array) else jnp.asarray(label_mask)
    if tuple(label_mask.shape) != want:
      raise ValueError(f"`label_mask` must have shape {want} (one weight per label), got "
                       f"{tuple(label_mask.shape)}.")
  return labels, label_mask, c


def checked_targets(setup: Setup, labels, label_mask, mask, kind: str, key):
  """``(labels, label_mask, row weights)`` of a categorical call, checked (see the callers)."""
  labels, label_mask, c = categorical_targets(setup.traced, setup.n, labels, label_mask, kind)
  weights = row_weights(mask, setup.n)
  if kind in LABELLED_KINDS:
    check_labels(labels, weights, label_mask, c)
  if kind == "sampled" and key is None:
    raise ValueError("`key` (a PRNG key) is required for kind='sampled'.")
  return Targets(labels, label_mask, weights)


def counts_nothing(weights, lmask, n: int) -> bool:
  """Whether concrete ``[n]`` row weights and ``[n, ...]`` label mask (either may be None) count
  no example; False when neither is given or either is traced."""
  given = [a for a in (weights, lmask) if a is not None]
  if not given or not all(validation.is_concrete(a) and validation.host_readable(a)
                          for a in given):
    return False
  counted = np.ones((n,), bool) if weights is None else np.asarray(weights).reshape(n) > 0
  if lmask is not None:
    counted &= (np.asarray(lmask).reshape(n, -1) > 0).any(axis=1)
  return not counted.any()


def check_something_counted(weights, lmask, n: int) -> None:
  """Raises when concrete ``mask`` / ``label_mask`` count no example: the Fisher is a mean over
  the counted rows, undefined over none (under ``jit``, traced masks, the result is NaN)."""
  if counts_nothing(weights, lmask, n):
    given = [name for name, a in (("mask", weights), ("label_mask", lmask)) if a is not None]
    names = " and ".join(f"`{name}`" for name in given)
    verb = "counts" if len(given) == 1 else "count"
    raise ValueError(f"{names} {verb} no example (every weight is 0): the Fisher is a mean over "
                     "the counted rows, undefined over none; give at least one nonzero weight.")


def row_weights(mask, n: int):
  """``mask`` as a checked ``[n]`` array of row weights (None stays None)."""
  if mask is None:
    return None
  mask = mask if isinstance(mask, jax.Array) else jnp.asarray(mask)
  if tuple(mask.shape) != (n,):
    raise ValueError(f"`mask` must have shape ({n},) to match `inputs`, got {tuple(mask.shape)}.")
  return mask


def check_labels(labels, weights, lmask, num_classes: int) -> None:
  """Concrete labels outside [0, C) (where counted) are refused, naming the first."""
  if labels is None or not all(validation.is_concrete(a) for a in (labels, weights, lmask)):
    return
  if all(validation.host_readable(a) for a in (labels, weights, lmask)):
    y = np.asarray(labels).reshape(labels.shape[0], -1)
    counted = np.ones(y.shape, bool)
    if weights is not None:
      counted &= np.asarray(weights)[:, None] > 0
    if lmask is not None:
      counted &= np.asarray(lmask).reshape(y.shape) > 0
    bad = np.argwhere(counted & ((y < 0) | (y >= num_classes)))
    count = len(bad)
    if count:
      row, value = int(bad[0][0]), int(y[bad[0][0], bad[0][1]])
  else:  # spread over several processes: the same search on the devices (docs/multihost.md)
    with jax.ensure_compile_time_eval():  # now, also while a jit traces (closed-over labels)
      found = labels_out_of_range(labels, weights, lmask, num_classes)
    count, row, value = (int(v) for v in found)
  if count:
    raise ValueError(
        f"`labels` must lie in [0, {num_classes}) for the {num_classes} logits of `logits_fn`, "
        f"but labels[{row}]={value} ({count} labels out of range; in domain-incremental "
        f"learning map global labels to the task's, e.g. label % {num_classes}).")


@functools.partial(jax.jit, static_argnums=3)
def labels_out_of_range(labels, weights, lmask, num_classes: int):
  """``(count, row, value)``: the counted labels outside [0, C), the first one's row and value
  (row-major, as ``np.argwhere``); replicated scalars, readable by every process."""
  y = labels.reshape(labels.shape[0], -1)
  counted = jnp.ones(y.shape, bool)
  if weights is not None:
    counted &= weights[:, None] > 0
  if lmask is not None:
    counted &= lmask.reshape(y.shape) > 0
  bad = (counted & ((y < 0) | (y >= num_classes))).reshape(-1)
  first = jnp.argmax(bad)
  return jnp.sum(bad), first // y.shape[1], y.reshape(-1)[first]


def raise_flags(flags, finite, paths, runtime_checks: bool, what: str) -> None:
  """Misuse found by the program: raised now when concrete, by a host callback under ``jit``."""
  messages = [misuse.PROBABILITIES.format(what=what), misuse.LABELS][:len(flags)]
  if all(validation.is_concrete(f) for f in list(flags) + list(finite)):
    for f, message in zip(flags, messages):
      if bool(np.any(np.asarray(f))):
        raise ValueError(message)
    for path, ok in zip(paths, finite):
      if not bool(np.all(np.asarray(ok))):
        raise ValueError(
            f"fisher_diagonal produced non-finite importance at leaf {path}: `{what}` gives "
            f"non-finite outputs or gradients on these inputs (check the data and parameters).")
    return
  if runtime_checks and flags:
    def check(*values):
      for v, message in zip(values, messages):
        if np.any(np.asarray(v)):
          raise ValueError(message)
    jax.debug.callback(check, *flags)
