"""Misuse that would otherwise give a silent wrong result or a misleading error: one clear message
each, naming the argument and the fix.

The table of cases is ``tests/test_misuse.py``; docs/library.md lists the pitfalls.

Example::

  >>> import jax.numpy as jnp
  >>> check_params({"params": {"w": jnp.ones(2)}, "batch_stats": {"m": jnp.ones(2)}}, "params")
  Traceback (most recent call last):
  ValueError: `params` holds linen's collections ['batch_stats', 'params']: ...
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any, Callable

import jax
import numpy as np

_COLLECTIONS = ("batch_stats", "cache", "intermediates", "losses", "perturbations", "state")
_AD_TRACERS = ("JVPTracer", "LinearizeTracer")

PROBABILITIES = (
    "`{what}` returned probabilities (every row is >= 0 and sums to 1), not logits: the Fisher "
    "needs logits (or log-probabilities), e.g. drop the final softmax, or return "
    "jnp.log(probs). With probabilities taken for logits the importance is ~20x too small.")
LABELS = ("`labels` must lie in [0, C) for the C logits of `logits_fn` (some counted label is "
          "outside; in domain-incremental learning map global labels to the task's, e.g. "
          "label % C).")


def _nnx():
  return sys.modules.get("flax.nnx")


def check_params(tree: Any, name: str) -> None:
  """Refuses an ``nnx.Module``, linen's whole variables dict and non-parameter NNX state."""
  nnx = _nnx()
  if nnx is not None and isinstance(tree, nnx.Module):
    raise ValueError(
        f"`{name}` is an nnx.Module ({type(tree).__name__}); pass its parameters: "
        f"nnx.state(model, nnx.Param) (and a logits_fn such as "
        f"`lambda p, x: nnx.merge(graphdef, p, rest)(x)` from "
        f"`graphdef, p, rest = nnx.split(model, nnx.Param, ...)`).")
  if isinstance(tree, Mapping) and "params" in tree:
    others = sorted(k for k in tree if k != "params")
    if others:
      raise ValueError(
          f"`{name}` holds linen's collections {sorted(tree)}: pass variables['params'] only "
          f"(the running statistics are not parameters: close over "
          f"{{'batch_stats': ...}} in logits_fn with train=False / use_running_average=True).")
  if nnx is None:
    return
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for leaf in leaves:
    if isinstance(leaf, nnx.Variable) and not isinstance(leaf, nnx.Param):
      raise ValueError(
          f"`{name}` holds an nnx.{type(leaf).__name__} Variable, which is not a parameter "
          f"(BatchNorm statistics, RNG state, caches): pass nnx.state(model, nnx.Param) or "
          f"nnx.split(model, nnx.Param, ...)[1].")


def check_output(out: Any, what: str) -> None:
  """``what``'s output must be one float array (not linen's ``(logits, updates)``)."""
  if isinstance(out, (tuple, list)) or not hasattr(out, "shape"):
    kind = f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else (
        f"a {type(out).__name__}")
    raise ValueError(
        f"`{what}` must return one array, but it returned {kind} (linen's "
        f"`apply(..., mutable=[...])` returns (logits, updates)): evaluate in eval mode without "
        f"`mutable` (BatchNorm on its running statistics), or return only the logits.")
  if not np.issubdtype(np.dtype(out.dtype), np.floating) and "bfloat16" not in str(out.dtype):
    raise ValueError(f"`{what}` must return floats, but it returned dtype {out.dtype}.")


def traced_call(fn: Callable[[], Any], what: str) -> Any:
  """Runs ``fn`` (a trace of ``what``), turning flax's trace-context error into the fix."""
  try:
    return fn()
  except Exception as err:  # noqa: BLE001 - re-raised below, typed
    if type(err).__name__ == "ModifyScopeVariableError":
      raise ValueError(
          f"`{what}` updates BatchNorm statistics (a linen model applied with train=True): "
          f"evaluate with train=False / use_running_average=True, the running statistics closed "
          f"over. Flax said: {str(err).splitlines()[0]}") from err
    if type(err).__name__ != "TraceContextError":
      raise
    said = str(err).splitlines()[0]
    if re.search(r"mutate (Param|Variable)\b", said):
      raise ValueError(
          f"`{what}` writes the parameters it is given into a module made outside it (e.g. "
          f"nnx.update(model, p)): build the model inside instead, `graphdef, p, rest = "
          f"nnx.split(model, nnx.Param, ...)` and `lambda p, x: nnx.merge(graphdef, p, rest)(x)`. "
          f"Flax said: {said}") from err
    raise ValueError(
        f"`{what}` changes state the Fisher cannot trace (an NNX Dropout, BatchNorm in "
        f"training mode or an nnx.Rngs stream): call model.eval() before the Fisher and "
        f"model.train() after (linen: train=False / deterministic=True). Flax said: "
        f"{said}") from err


# Primitives that draw random values (making a key, folding or splitting it draws nothing).
_RANDOM = ("random_bits", "threefry2x32", "rng_bit_generator", "rng_uniform")


def check_deterministic(closed, what: str) -> None:
  """A function whose output depends on random draws (dropout in training mode) is refused: its
  Fisher would weigh another, noisy function than the one evaluated. Keys made, split or drawn
  from without reaching the output (e.g. an RNG stream set up in evaluation mode) are fine."""
  jaxpr = closed.jaxpr
  noisy: set = set()
  for eqn in jaxpr.eqns:
    draws = eqn.primitive.name in _RANDOM or _draws_inside(eqn)
    if draws or any(not hasattr(v, "val") and v in noisy for v in eqn.invars):
      noisy.update(eqn.outvars)
  drawn = [v for v in jaxpr.outvars if not hasattr(v, "val") and v in noisy]
  if drawn:
    raise ValueError(
        f"`{what}` draws random numbers that reach its output (dropout or another layer in "
        f"training mode): the Fisher is taken in evaluation mode. Call model.eval() (NNX) or "
        f"pass train=False / deterministic=True (linen).")


def _draws_inside(eqn) -> bool:
  """Whether a nested jaxpr of ``eqn`` (scan, cond, custom derivative, ...) draws."""
  stack = []
  for value in eqn.params.values():
    for sub in (value if isinstance(value, (tuple, list)) else (value,)):
      inner = getattr(sub, "jaxpr", sub)
      if hasattr(inner, "eqns"):
        stack.append(inner)
  while stack:
    jaxpr = stack.pop()
    for e in jaxpr.eqns:
      if e.primitive.name in _RANDOM:
        return True
      for value in e.params.values():
        for sub in (value if isinstance(value, (tuple, list)) else (value,)):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            stack.append(inner)
  return False


def check_uses_params(plan: list, what: str) -> None:
  """Every weighed leaf unused: the function does not read the ``params`` it is given."""
  methods = [m for m, _ in plan if m != "masked"]
  if methods and all(m == "unused" for m in methods):
    raise ValueError(
        f"`{what}`'s output does not depend on the `params` it is given (every importance would "
        f"be 0): it must compute with its first argument, e.g. `lambda p, x: model.apply("
        f"{{'params': p}}, x)` or `lambda p, x: nnx.merge(graphdef, p, rest)(x)`, not a "
        f"closure over the model's own parameters.")


def is_ad_tracer(x: Any) -> bool:
  """True when ``x`` is being differentiated (a JVP/linearize tracer, also under vmap)."""
  seen = 0
  while isinstance(x, jax.core.Tracer) and seen < 16:
    if type(x).__name__ in _AD_TRACERS:
      return True
    x = getattr(x, "val", getattr(x, "primal", None))
    seen += 1
  return False


def check_anchor_not_traced(params: Any) -> None:
  """An Anchor of parameters being differentiated would hold θ itself: the penalty and its
  gradient would be exactly 0 (EWC silently off)."""
  if any(is_ad_tracer(x) for x in jax.tree.leaves(params)):
    raise ValueError(
        "`Anchor(params=...)` got parameters that are being differentiated (inside the loss "
        "under jax.grad): the anchor would be θ itself and the penalty exactly 0. Build the "
        "anchors once after training a task, outside the loss, and pass them in (e.g. as an "
        "argument of the jitted train step).")


def check_not_self_anchored(params_leaves: list, anchor_leaves: list, name: str) -> None:
  """The same array objects in ``params`` and an anchor: a penalty of exactly 0."""
  ids = {id(x) for x in params_leaves if is_ad_tracer(x)}
  if ids and any(id(x) in ids for x in anchor_leaves):
    raise ValueError(
        f"`{name}` holds the very parameters being penalised (an Anchor built inside the loss "
        f"from its own argument): the penalty and its gradient would be exactly 0. Build the "
        f"anchors after training a task, outside the loss.")


def check_number(name: str, value: Any) -> None:
  """Strings and other non-numbers are refused by name (a flag value not converted)."""
  if isinstance(value, (str, bytes)):
    raise ValueError(f"`{name}` must be a number, but got the string {value!r}: convert it, "
                     f"e.g. {name}=float({value!r}).")
  if value is None or isinstance(value, (dict, set)):
    raise ValueError(f"`{name}` must be a number, but got {value!r}.")
