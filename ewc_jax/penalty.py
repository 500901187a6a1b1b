"""EWC penalties: pure functions of ``(params, anchors)`` on any pytree.

An *anchor* is what EWC keeps after task k: the frozen parameters θ*_k and their importance F_k
(a diagonal Fisher estimate, same tree as θ). The penalties below read like optax losses: small,
pure, jittable and differentiable, and they accept every pytree (Flax, Haiku, Equinox, dicts).

Anchors come either as a sequence of :class:`Anchor` (one per previous task) or as one *stacked*
:class:`Anchor` whose leaves carry a leading task axis ``[K, ...]``. A stacked anchor lets a
compiled train step serve every task with one shape: unused slots simply hold zero importance,
and a zero-importance slot contributes exactly nothing (value and gradient).

References:
  Kirkpatrick et al., 2017. Overcoming catastrophic forgetting in neural networks. PNAS 114(13).
  CLArena ``EWC`` (reference implementation this project offers parity modes for).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax

from ewc_jax import masks as masks_lib
from ewc_jax import misuse
from ewc_jax import validation
from ewc_jax import variables

PyTree = Any


class _AnchorFields(NamedTuple):
  params: PyTree
  importance: PyTree


class Anchor(_AnchorFields):
  """What EWC remembers of one previous task: θ*_k and F_k (a frozen copy, checked).

  Building an Anchor (a) replaces Flax NNX Variables by their current values, so that an anchor
  made from ``nnx.split(model, nnx.Param)`` or ``nnx.state(model, nnx.Param)`` -- the model's
  *live* Variables -- stays θ*_k while the model trains on (JAX arrays are immutable: holding the
  values is a copy); (b) checks that the importance has the structure and shapes of ``params``
  and, when concrete, is finite and >= 0 everywhere (inside ``jit``, traced importance, that
  value check is skipped). JAX's own tree operations
  (``jax.tree.map``, ``jit`` arguments, unflattening) rebuild anchors without either step.

  Attributes:
    params: θ*_k, the parameters right after training task k (any pytree; NNX Variables are
      replaced by arrays).
    importance: F_k, the diagonal importance, same structure and shapes as ``params``.

  Example::

    >>> import jax.numpy as jnp
    >>> a = Anchor(params={"w": jnp.ones(2)}, importance={"w": jnp.full(2, 0.5)})
    >>> float(ewc_loss({"w": jnp.zeros(2)}, (a,), lam=2.0))   # (2/2) * 2 * 0.5 * 1²
    1.0
  """
  __slots__ = ()

  def __new__(cls, params: PyTree, importance: PyTree):
    misuse.check_params(params, "Anchor.params")
    misuse.check_params(importance, "Anchor.importance")
    misuse.check_anchor_not_traced(params)
    params, importance = variables.as_arrays(params), variables.as_arrays(importance)
    validation.check_same_structure("Anchor.importance", params, importance, "Anchor.params")
    validation.check_importance("Anchor.importance", importance)
    return super().__new__(cls, params, importance)


def _anchor_flatten_with_keys(a):
  return ((jax.tree_util.GetAttrKey("params"), a.params),
          (jax.tree_util.GetAttrKey("importance"), a.importance)), None


def _anchor_unflatten(_, children):
  return tuple.__new__(Anchor, tuple(children))   # no copy, no check: leaves may be anything


jax.tree_util.register_pytree_with_keys(
    Anchor, _anchor_flatten_with_keys, _anchor_unflatten,
    lambda a: ((a.params, a.importance), None))


class Merged(NamedTuple):
  r"""Sufficient statistics of Σ_k F_k (θ − θ*_k)² (p = 2): memory O(1) in the number of tasks.

  .. math::  \sum_k F_k (\theta - \theta^*_k)^2 = A\,(\theta - m)^2 + c,\quad
             A = \sum_k F_k,\; m = \frac{\sum_k F_k \theta^*_k}{A},\;
             c = \sum_k \sum_i F_{k,i} (\theta^*_{k,i} - m_i)^2

  Same value and gradient ``2 A (θ − m) = 2 Σ_k F_k (θ − θ*_k)`` as separate anchors, written
  around the weighted mean m so that no large terms cancel (the naive A θ² − 2Bθ + C form loses
  the penalty's digits in float32 near the anchors).

  Attributes:
    weight: A, a pytree like params.
    center: m (θ*_k where A = 0), a pytree like params.
    const: c, a float32 scalar.
  """
  weight: PyTree
  center: PyTree
  const: jax.Array


def empty_merged(params: PyTree) -> Merged:
  """The statistics of no anchor (contributes nothing)."""
  params = variables.as_arrays(params)
  zeros = lambda: jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)  # noqa: E731
  return Merged(weight=zeros(), center=zeros(), const=jnp.zeros((), jnp.float32))


def merge_anchor(merged: Merged, anchor: Anchor, decay: Any = 1.0) -> Merged:
  """Adds one anchor: statistics of ``decay · (previous terms) + F (θ − θ*)²`` (jittable).

  ``decay = 1`` keeps every previous task's term whole (EWC with merged anchors); ``decay < 1``
  down-weights them (online EWC keeps only the newest anchor: see ``ewc_jax.algorithms``).
  ``decay`` (γ) must lie in (0, 1] (checked when concrete).
  """
  validation.check_unit_interval("decay", decay)
  def leaf(a, m, f, t):
    a = decay * a
    f = f.astype(jnp.float32)
    t = t.astype(jnp.float32)
    total = a + f
    safe = jnp.where(total > 0, total, 1.0)
    center = jnp.where(total > 0, (a * m + f * t) / safe, t)
    extra = jnp.sum(a * jnp.square(m - center) + f * jnp.square(t - center))
    return total, center, extra
  # Flat lists, not a tree of (total, center, extra) triples: a params tree may itself contain
  # 3-tuples, which an ``is_leaf`` test for triples would mistake for results.
  treedef = jax.tree.structure(merged.weight)
  out = [leaf(*xs) for xs in zip(*(treedef.flatten_up_to(t) for t in (
      merged.weight, merged.center, anchor.importance, anchor.params)))]
  weight = jax.tree.unflatten(treedef, [o[0] for o in out])
  center = jax.tree.unflatten(treedef, [o[1] for o in out])
  extra = sum(o[2] for o in out)
  return Merged(weight=weight, center=center, const=decay * merged.const + extra)


def merged_distance(params: PyTree, merged: Merged) -> jax.Array:
  """Σ_i A_i (θ_i − m_i)² + c  (= Σ_k Σ_i F_ki (θ_i − θ*_ki)² of the merged anchors)."""
  params = variables.as_arrays(params)
  terms = jax.tree.map(
      lambda t, a, m: jnp.sum(a * jnp.square(t.astype(jnp.float32) - m)),
      params, merged.weight, merged.center)
  return sum(jax.tree.leaves(terms), merged.const)


Anchors = Union[Sequence[Anchor], Anchor]


def stack_anchors(anchors: Sequence[Anchor]) -> Anchor:
  """Stacks a sequence of anchors into one :class:`Anchor` with a leading task axis ``[K, ...]``.

  Example::

    >>> import jax.numpy as jnp
    >>> a = Anchor(params={"w": jnp.zeros(3)}, importance={"w": jnp.ones(3)})
    >>> stack_anchors([a, a]).params["w"].shape
    (2, 3)
  """
  if not anchors:
    raise ValueError("`anchors` must hold at least one Anchor to stack, got an empty sequence.")
  anchors = [a if isinstance(a, Anchor) else Anchor(*a) for a in anchors]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *anchors)


def empty_anchors(params: PyTree, num_slots: int) -> Anchor:
  """A stacked anchor with ``num_slots`` zero-importance slots (contributes nothing)."""
  if num_slots < 1:
    raise ValueError(f"`num_slots` should be >= 1, but got num_slots={num_slots}.")
  params = variables.as_arrays(params)
  def zeros():
    return jax.tree.map(lambda p: jnp.zeros((num_slots,) + jnp.shape(p), jnp.result_type(p)),
                        params)
  return Anchor(params=zeros(), importance=zeros())


def set_anchor(stacked: Anchor, slot: Any, anchor: Anchor) -> Anchor:
  """Returns a new stacked anchor whose ``slot`` holds ``anchor`` (functional update, jittable)."""
  return jax.tree.map(lambda s, a: s.at[slot].set(a), stacked, Anchor(*anchor))


class _Stacked(NamedTuple):
  """Anchors as flat lists in the leaf order of ``params``: ``[K, *leaf.shape]`` each."""
  params: list
  importance: list


def _bare_anchor_error(name: str) -> ValueError:
  return ValueError(
      f"`{name}` is one Anchor whose leaves have the shapes of `params` (no leading task "
      f"axis): pass one task's anchor as a sequence, `{name}=(anchor,)`, or stack several with "
      f"ewc_jax.stack_anchors. A bare Anchor is read as a stacked one ([K, ...] leaves).")


def _as_stacked(params: PyTree, anchors: Anchors, name: str = "anchors") -> _Stacked | None:
  """Validates ``anchors`` against ``params`` (NNX Variables dropped) and returns them stacked
  as flat leaf lists (None when empty)."""
  if isinstance(anchors, Anchor):
    p_shapes = [jnp.shape(x) for x in jax.tree.leaves(params)]
    for field in ("params", "importance"):
      shapes = [jnp.shape(x) for x in jax.tree.leaves(getattr(anchors, field))]
      if shapes == p_shapes or any(len(s) == 0 for s in shapes):
        raise _bare_anchor_error(name)
    unstacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)),
                             anchors)
    validation.check_same_structure(f"{name}.params", params, unstacked.params)
    validation.check_same_structure(f"{name}.importance", params, unstacked.importance)
    validation.check_importance(f"{name}.importance", anchors.importance)
    return _Stacked(jax.tree.leaves(anchors.params), jax.tree.leaves(anchors.importance))
  checked = []
  for k, anchor in enumerate(anchor_sequence(anchors, name)):
    validation.check_same_structure(f"{name}[{k}].params", params, anchor.params)
    validation.check_same_structure(f"{name}[{k}].importance", params, anchor.importance)
    checked.append((jax.tree.leaves(anchor.params), jax.tree.leaves(anchor.importance)))
  if not checked:
    return None
  return _Stacked(*([jnp.stack(xs) for xs in zip(*(c[j] for c in checked))] for j in (0, 1)))


def anchor_sequence(anchors, name: str = "anchors") -> tuple[Anchor, ...]:
  """``anchors`` (a sequence of :class:`Anchor` or ``(params, importance)`` pairs) as a tuple of
  Anchors of plain arrays (NNX Variables dropped), each checked where concrete: its importance
  has the structure of its params and is finite and >= 0. The one check of a sequence of anchors
  (the penalties, :func:`ewc_jax.save_anchors`); errors name ``name[k]``."""
  if not isinstance(anchors, (list, tuple)):
    raise ValueError(
        f"`{name}` must be a sequence of ewc_jax.Anchor or one stacked Anchor, got "
        f"{type(anchors).__name__}.")
  out = []
  for k, anchor in enumerate(anchors):
    if not isinstance(anchor, Anchor) and not (isinstance(anchor, tuple) and len(anchor) == 2):
      raise ValueError(
          f"`{name}[{k}]` must be an ewc_jax.Anchor(params, importance), got "
          f"{type(anchor).__name__}.")
    a_params, a_imp = (variables.as_arrays(x) for x in anchor)
    validation.check_same_structure(f"{name}[{k}].importance", a_params, a_imp,
                                    f"{name}[{k}].params")
    validation.check_importance(f"{name}[{k}].importance", a_imp)
    out.append(tuple.__new__(Anchor, (a_params, a_imp)))  # checked above: no second check
  return tuple(out)


def abs_pow(x: jax.Array, p: Any) -> jax.Array:
  """|x|^p with a finite gradient everywhere (0 at x = 0, also for p <= 1); p = 2 is ``x * x``."""
  if isinstance(p, (int, float)) and p == 2:
    return x * x
  ax = jnp.abs(x)
  nonzero = ax > 0
  safe = jnp.where(nonzero, ax, 1.0)
  return jnp.where(nonzero, safe ** p, 0.0)


def ewc_loss(params: PyTree, anchors: Anchors, *, lam: Any, p: Any = 2.0,
             leaf_mask: masks_lib.LeafMask = None) -> jax.Array:
  r"""Standard EWC penalty (Kirkpatrick et al. 2017, eq. 3, generalised to a p-power).

  .. math::  R(\theta) = \frac{\lambda}{2} \sum_k \sum_{i \in M} F_{k,i}\,
             |\theta_i - \theta^*_{k,i}|^p

  summed (not averaged) over previous tasks k and over the leaves M chosen by ``leaf_mask``
  (all by default). With p = 2 its gradient is ``lam * sum_k F_k * (params - anchor_k)``.

  Args:
    params: current parameters θ (any pytree; an ``nnx.State`` of Variables included, e.g.
      ``nnx.state(model, nnx.Param)`` inside an ``nnx.value_and_grad`` loss).
    anchors: a sequence of :class:`Anchor` (one per previous task) or one stacked
      :class:`Anchor` (leaves ``[K, ...]``); one task's anchor alone is ``(anchor,)``.
    lam: λ >= 0; ``lam=0`` switches the penalty off (value and gradient exactly 0 for finite
      parameters, eagerly and under ``jit``). May be traced (e.g. ``vmap`` over a sweep): a
      traced λ that is negative or non-finite cannot raise, so it makes the penalty and its
      gradient NaN (never a silently negative penalty).
    p: exponent p > 0 (default 2); a traced p <= 0 gives NaN likewise.
    leaf_mask: which leaves to penalise (``ewc_jax.masks``: a bool pytree, a prefix of one, or
      ``mask_fn(params)``); the anchors still cover every leaf of ``params``.

  Returns:
    A float32 scalar; 0 when ``anchors`` is empty.

  Raises:
    ValueError: mismatched tree structure or shapes (names the leaf path), a bare unstacked
      Anchor, λ < 0, p <= 0, negative or non-finite importance -- checked when the values are
      concrete.

  Example::

    >>> import jax.numpy as jnp
    >>> a = Anchor(params={"w": jnp.zeros(2)}, importance={"w": jnp.array([1.0, 3.0])})
    >>> float(ewc_loss({"w": jnp.ones(2)}, [a], lam=0.5))      # 0.25 * (1 + 3)
    1.0
  """
  validation.check_non_negative("lam", lam)
  validation.check_positive("p", p)
  lam, p = validation.non_negative_or_nan(lam), validation.positive_or_nan(p)  # traced: NaN if bad
  misuse.check_params(params, "params")
  params = variables.as_arrays(params)
  misuse.check_not_self_anchored(jax.tree.leaves(params), jax.tree.leaves(anchors), "anchors")
  stacked = _as_stacked(params, anchors)
  if stacked is None:
    return jnp.zeros((), jnp.float32)
  on = masks_lib.resolve(leaf_mask, params)
  return _half_lambda_times(lam, by_exponent(
      p, lambda q: _weighted_distance(jax.tree.leaves(params), stacked, q, on)))


def ewc_penalty(params: PyTree, *, lam: Any, p: Any = 2.0, anchors: Anchor | None = None,
                merged: Merged | None = None) -> jax.Array:
  r""":func:`ewc_loss`'s value, (λ/2) Σ_k Σ_i F_{k,i} |θ_i − θ*_{k,i}|^p, on the memory a
  compiled train step carries: a stacked ``anchors`` (leaves ``[K, ...]``, free slots of zero
  importance) and/or their p = 2 statistics ``merged`` (:func:`merge_anchor`). No input checks
  (it runs inside ``jit`` on memory built by this module); the continual-learning algorithms
  (:mod:`ewc_jax.algorithms`) call it.

  p = 2 reads ``merged`` when given (one pass instead of one per anchor: same value and
  gradient); a traced ``p`` chooses at run time (:func:`by_exponent`).

  Example::

    >>> import jax.numpy as jnp
    >>> a = Anchor(params={"w": jnp.zeros(2)}, importance={"w": jnp.array([1.0, 3.0])})
    >>> theta = {"w": jnp.ones(2)}
    >>> float(ewc_penalty(theta, lam=0.5, anchors=stack_anchors([a])))   # 0.25 * (1 + 3)
    1.0
    >>> float(ewc_penalty(theta, lam=0.5, merged=merge_anchor(empty_merged(theta), a)))
    1.0
  """
  two = isinstance(p, (int, float)) and p == 2
  if anchors is None and not (merged is not None and two):
    raise ValueError(f"`anchors` is None with `merged`={type(merged).__name__} and `p`={p!r}: "
                     "expected a stacked Anchor, or `merged` statistics with p = 2.")
  if merged is None:
    return _half_lambda_times(lam, weighted_distance(params, anchors, p))
  if anchors is None:
    return _half_lambda_times(lam, merged_distance(params, merged))

  def distance(q):
    if isinstance(q, (int, float)) and q == 2:
      return merged_distance(params, merged)
    return weighted_distance(params, anchors, q)
  return _half_lambda_times(lam, by_exponent(p, distance))


def _half_lambda_times(lam: Any, distance: jax.Array) -> jax.Array:
  """λ/2 times the distance: the penalty's one scaling (every penalty of this module)."""
  return 0.5 * lam * distance


def by_exponent(p: Any, distance) -> jax.Array:
  """``distance(p)``, with ``distance(2.0)`` (the exact ``x * x`` and merged p = 2 paths) when
  ``p`` is traced and equals 2 at run time: one ``lax.cond`` for the whole penalty, whose
  gradient keeps both branches' residuals (a general power costs an ``exp`` and a ``log`` per
  element). A Python number chooses at trace time."""
  if isinstance(p, (int, float)):
    return distance(p)
  return lax.cond(jnp.asarray(p) == 2, lambda: distance(2.0), lambda: distance(p))


def weighted_distance(params: PyTree, stacked: Anchor, p: Any = 2.0) -> jax.Array:
  """Σ_k Σ_i F_{k,i} |θ_i − θ*_{k,i}|^p for a stacked anchor (no checks, no λ).

  A traced ``p`` takes the exact ``x * x`` branch at run time when it equals 2 (one ``lax.cond``
  for the whole penalty): a general power costs an ``exp`` and a ``log`` per element. The sum
  over the (static) task axis is unrolled: XLA's CPU backend is ~20x slower at the equivalent
  broadcast-and-reduce over a leading axis (measured with benchmarks/train_step.py).
  """
  params = variables.as_arrays(params)
  flat = _Stacked(jax.tree.leaves(stacked.params), jax.tree.leaves(stacked.importance))
  return by_exponent(p, lambda q: _weighted_distance(jax.tree.leaves(params), flat, q,
                                                     (True,) * len(flat.params)))


def _weighted_distance(theta_leaves, stacked, p, on):
  def leaf_term(theta, ref, imp):
    theta = theta.astype(jnp.float32)
    total = jnp.zeros(theta.shape, jnp.float32)
    for k in range(ref.shape[0]):
      total = total + imp[k].astype(jnp.float32) * abs_pow(theta - ref[k].astype(jnp.float32), p)
    return jnp.sum(total)
  terms = [leaf_term(t, r, f) for t, r, f, m in
           zip(theta_leaves, stacked.params, stacked.importance, on) if m]
  return sum(terms, jnp.zeros((), jnp.float32))


def seed_parity_loss(params: PyTree, anchors: Anchors, *, factor: Any, p: Any = 2.0,
                     task_id: Any = 1) -> jax.Array:
  r"""The seed reference's penalty (CLArena, early 2025), reproduced exactly.

  For each previous task k and each parameter *tensor* W:

  .. math::  \text{term}_{k,W} = \text{factor} \cdot \Big(\sum_{e \in W} F_{k,e}\Big)
             \cdot \lVert W - W^*_k \rVert_p

  with ‖·‖_p the p-norm of the flattened tensor difference (not raised to p). The terms are summed
  over k and W; when the current (1-based) ``task_id`` is > 1 the sum is divided by ``task_id``.
  This is not a quadratic penalty; it is here to reproduce that code's numbers.

  Args:
    params: as in :func:`ewc_loss`.
    anchors: as in :func:`ewc_loss`.
    factor: the reference's ``parameter_change_reg_factor`` (> 0).
    p: the reference's ``parameter_change_reg_p_norm`` (> 0).
    task_id: the current task's 1-based id (may be traced). Zero-importance stacked slots
      contribute exactly 0 (ΣF = 0), so unused slots need no mask.
  """
  validation.check_positive("factor", factor)
  validation.check_positive("p", p)
  # Traced (the runner's sweeps): NaN for a negative or non-finite factor or p <= 0 (a factor of
  # 0, refused when concrete, is the harmless "no penalty" there).
  factor, p = validation.non_negative_or_nan(factor), validation.positive_or_nan(p)
  params = variables.as_arrays(params)
  stacked = _as_stacked(params, anchors)
  if stacked is None:
    return jnp.zeros((), jnp.float32)

  def leaf_term(theta, ref, imp):
    k = ref.shape[0]
    diff = (theta[None].astype(jnp.float32) - ref.astype(jnp.float32)).reshape(k, -1)
    total = jnp.sum(abs_pow(diff, p), axis=1)
    nonzero = total > 0
    norm = jnp.where(nonzero, jnp.where(nonzero, total, 1.0) ** (1.0 / p), 0.0)
    return jnp.sum(imp.astype(jnp.float32).reshape(k, -1), axis=1) * norm

  per_slot = sum(leaf_term(t, r, f) for t, r, f in
                 zip(jax.tree.leaves(params), stacked.params, stacked.importance))
  total = factor * jnp.sum(per_slot)
  task_id = jnp.asarray(task_id, jnp.float32)
  return jnp.where(task_id > 1, total / task_id, total)


def clarena_loss(params: PyTree, anchors: Anchors, *, factor: Any) -> jax.Array:
  r"""CLArena 1.1.0's penalty: ``0.5 · factor · Σ_k Σ_i F_{k,i} (θ_i − θ*_{k,i})²``.

  Summed over previous tasks, no division by the task id. Numerically this is :func:`ewc_loss`
  with ``lam=factor, p=2``; pair it with ``fisher_diagonal(kind="batch_squared")`` (no
  parameter-count normalisation) for full 1.1.0 parity.
  """
  validation.check_positive("factor", factor)
  return ewc_loss(params, anchors, lam=factor, p=2.0)


__all__ = ["Anchor", "Anchors", "Merged", "abs_pow", "anchor_sequence", "by_exponent",
           "clarena_loss", "empty_anchors", "empty_merged", "ewc_loss", "ewc_penalty",
           "merge_anchor", "merged_distance", "seed_parity_loss", "set_anchor", "stack_anchors",
           "weighted_distance"]
