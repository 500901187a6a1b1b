r"""Diagonal Fisher / importance estimators: pure functions returning a pytree shaped like ``params``.

All estimators take ``logits_fn(params, x_batch) -> [B, C]`` and data ``inputs [N, ...]``,
``labels [N]``; ℓ(x, y; θ) = −log softmax(logits_fn(θ, x))_y (a stable log-softmax, finite for
huge logits). Data are processed in batches with a ``lax.scan``, the last partial batch padded and
masked, and every sum is accumulated in float32. The result is a mean over the N (unmasked)
examples.

Kinds (see SPEC.md):

* ``"empirical"`` (default): :math:`F_i = \frac1N \sum_n (\partial_i \ell(x_n, y_n))^2`,
  per-example gradients with the true labels.
* ``"true"``: :math:`F_i = \frac1N \sum_n \sum_c p_\theta(c|x_n)\,(\partial_i \ell(x_n, c))^2`,
  the exact expectation over the model's predictive distribution (C backward passes).
* ``"sampled"``: one label :math:`y_n \sim p_\theta(\cdot|x_n)` per example (needs ``key``).
* ``"predicted"``: :math:`y_n = \arg\max_c p_\theta(c|x_n)` (Hsu et al. 2018; van de Ven & Tolias 2019).
* ``"batch_squared"`` (reference parity, *not* a Fisher):
  :math:`F_i = \frac1N \sum_b B_b\,(\partial_i L_b)^2` with :math:`L_b` the mean loss of batch b
  of size :math:`B_b` -- squares of means, so it depends on ``batch_size``. This is CLArena's
  estimator; ``normalize_by_num_params=True`` additionally divides by the number of parameters,
  as the seed reference did.

Per-example squared gradients, fast and exact. ``jax.vmap(jax.grad(...))`` materialises B copies
of every weight. For a Dense use ``z = a @ W`` (a: the layer input of *one* example) the
per-example gradient is the outer product :math:`a^\top \delta` with :math:`\delta = \partial\ell/\partial z`,
so :math:`\sum_b w_b (\partial_W \ell_b)^2 = (w \circ a \circ a)^\top (\delta \circ \delta)`: one matmul.
``method="auto"`` finds such uses model-agnostically: it traces ``logits_fn`` for a *single*
example to a jaxpr, marks every ``dot_general`` whose right operand is a parameter leaf used
nowhere else, re-evaluates the jaxpr under ``vmap`` with a zero "tap" added to each marked output
(its gradient is δ) and records the left operand (a). All other leaves (biases, convolutions,
shared weights, ...) get exact ``vmap(grad)`` per-example gradients, which are cheap for them.
``method="vmap"`` uses ``vmap(grad)`` for every leaf (the reference fallback).

References:
  Kirkpatrick et al., 2017. Overcoming catastrophic forgetting in neural networks. PNAS.
  Martens, 2020. New insights and perspectives on the natural gradient method. JMLR.
  Kunstner, Balles & Hennig, 2019. Limitations of the empirical Fisher approximation. NeurIPS.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.extend import core as jex_core

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]

KINDS = ("empirical", "true", "sampled", "predicted", "batch_squared")
METHODS = ("auto", "vmap")

_LOG = logging.getLogger(__name__)


def fisher_diagonal(
    logits_fn: LogitsFn,
    params: PyTree,
    inputs: jax.Array,
    labels: jax.Array | None = None,
    *,
    kind: str = "empirical",
    batch_size: int = 256,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
    normalize_by_num_params: bool = False,
    method: str = "auto",
) -> PyTree:
  """Diagonal importance of ``params`` on ``(inputs, labels)``; see the module docstring.

  Args:
    logits_fn: ``logits_fn(params, x_batch) -> [B, C]`` logits, in evaluation mode. Close over
      anything that is not to be weighted (e.g. the task's head).
    params: the parameters to weigh (any pytree of float arrays).
    inputs: ``[N, ...]`` inputs.
    labels: ``[N]`` integer labels; required for ``"empirical"`` and ``"batch_squared"``.
    kind: one of ``"empirical" | "true" | "sampled" | "predicted" | "batch_squared"``.
    batch_size: examples per scan step (for ``batch_squared`` it changes the result).
    key: PRNG key, required for ``"sampled"``.
    mask: optional ``[N]`` 0/1 weights; masked-out rows are ignored and not counted in N. This
      lets one compiled program serve data sets of different sizes padded to one shape.
    normalize_by_num_params: divide by the total number of scalars in ``params`` (seed parity).
    method: ``"auto"`` (Dense fast path where exact, ``vmap(grad)`` elsewhere) or ``"vmap"``.

  Returns:
    A float32 pytree with the structure and shapes of ``params``.
  """
  if kind not in KINDS:
    raise ValueError(f"`kind` must be one of {', '.join(KINDS)}, but got kind={kind!r}.")
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {', '.join(METHODS)}, but got method={method!r}.")
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"`batch_size` should be a positive integer, but got batch_size={batch_size!r}.")
  inputs = jnp.asarray(inputs)
  if inputs.ndim < 1 or inputs.shape[0] == 0:
    raise ValueError(f"`inputs` must be a non-empty [N, ...] array, got shape {inputs.shape}.")
  n = inputs.shape[0]
  if labels is None:
    if kind in ("empirical", "batch_squared"):
      raise ValueError(f"`labels` are required for kind={kind!r}.")
    labels = jnp.zeros((n,), jnp.int32)
  labels = jnp.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"`labels` must have shape ({n},) to match `inputs`, got {labels.shape}.")
  if kind == "sampled" and key is None:
    raise ValueError("`key` (a PRNG key) is required for kind='sampled'.")
  weights = jnp.ones((n,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  if weights.shape != (n,):
    raise ValueError(f"`mask` must have shape ({n},) to match `inputs`, got {weights.shape}.")
  if mask is not None:
    # Masked-out rows take the values of a counted row: their weight is 0, but 0 * NaN = NaN,
    # so garbage there (NaN/inf in padded data) would otherwise poison every sum.
    keep = weights > 0
    first = jnp.argmax(keep)
    inputs = jnp.where(keep.reshape((n,) + (1,) * (inputs.ndim - 1)), inputs, inputs[first])
    labels = jnp.where(keep, labels, labels[first])

  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  def batched(a, mode):
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), mode=mode)
    return a.reshape((num_batches, batch_size) + a.shape[1:])
  # Padding rows repeat the last row (zeros may lie outside the model's domain) with weight 0.
  xs, ys = batched(inputs, "edge"), batched(labels.astype(jnp.int32), "edge")
  ws = batched(weights, "constant")

  sq_grad_sum = _make_sq_grad_sum(logits_fn, params, inputs[0], method)
  contribution = _make_batch_contribution(logits_fn, kind, sq_grad_sum)
  if key is None:
    key = jax.random.key(0)  # unused by the deterministic kinds

  def body(acc, batch):
    xb, yb, wb, i = batch
    c = contribution(params, xb, yb, wb, jax.random.fold_in(key, i))
    return jax.tree.map(jnp.add, acc, c), None

  acc0 = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
  acc, _ = lax.scan(body, acc0, (xs, ys, ws, jnp.arange(num_batches)))
  denom = jnp.maximum(jnp.sum(weights), 1.0)
  if normalize_by_num_params:
    denom = denom * num_parameters(params)
  return jax.tree.map(lambda a: a / denom, acc)


def num_parameters(params: PyTree) -> int:
  """Total number of scalars in ``params``."""
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(params)))


def _xent(logits: jax.Array, label: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), label)


def _make_batch_contribution(logits_fn, kind, sq_grad_sum):
  """Returns ``f(params, xb, yb, wb, key) -> pytree`` of this batch's summed contribution."""
  if kind == "batch_squared":
    def batch_squared(params, xb, yb, wb, key):
      del key
      count = jnp.sum(wb)
      def mean_loss(p):
        return jnp.sum(wb * _xent(logits_fn(p, xb), yb)) / jnp.maximum(count, 1.0)
      g = jax.grad(mean_loss)(params)
      return jax.tree.map(lambda x: count * jnp.square(x.astype(jnp.float32)), g)
    return batch_squared

  if kind == "empirical":
    return lambda params, xb, yb, wb, key: sq_grad_sum(params, xb, yb, wb)

  def model_labels(params, xb, yb, wb, key):
    logits = lax.stop_gradient(logits_fn(params, xb)).astype(jnp.float32)
    if kind == "predicted":
      return sq_grad_sum(params, xb, jnp.argmax(logits, axis=-1).astype(jnp.int32), wb)
    if kind == "sampled":
      return sq_grad_sum(params, xb, jax.random.categorical(key, logits).astype(jnp.int32), wb)
    probs = jax.nn.softmax(logits, axis=-1)  # kind == "true": exact expectation over classes
    def over_class(c, acc):
      yc = jnp.full(yb.shape, c, jnp.int32)
      return jax.tree.map(jnp.add, acc, sq_grad_sum(params, xb, yc, wb * probs[:, c]))
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    return lax.fori_loop(0, logits.shape[-1], over_class, zeros)
  return model_labels


def _make_sq_grad_sum(logits_fn, params, example, method):
  """Returns ``f(params, xb, yb, wb) = Σ_b w_b (∂ℓ(x_b, y_b)/∂θ)²`` (a pytree)."""
  if method == "auto":
    try:
      return _dense_sq_grad_sum(logits_fn, params, example)
    except _NoDenseSites:
      pass
    except Exception as err:  # pylint: disable=broad-except  # robust fallback, still exact
      _LOG.info("Dense fast path unavailable (%s); using vmap(grad).", err)
  return _vmap_sq_grad_sum(logits_fn)


def _vmap_sq_grad_sum(logits_fn):
  def per_example_loss(params, x, y):
    return _xent(logits_fn(params, x[None])[0], y)
  per_example_grads = jax.vmap(jax.grad(per_example_loss), in_axes=(None, 0, 0))

  def sq_grad_sum(params, xb, yb, wb):
    g = per_example_grads(params, xb, yb)
    return jax.tree.map(
        lambda x: jnp.tensordot(wb, jnp.square(x.astype(jnp.float32)), axes=1), g)
  return sq_grad_sum


class _NoDenseSites(Exception):
  pass


def _dense_sites(jaxpr, num_leaves: int) -> dict[int, int]:
  """Maps eqn index -> param-leaf index for ``dot_general(a, W)`` uses that admit the identity.

  Conditions: W is a rank-2 parameter leaf used by this one equation only; it is the right
  operand, contracted on its first axis, with no batch dimensions; the left operand belongs to
  one example (rank 1, or rank 2 with a leading 1), so the gradient is an outer product.
  """
  leaf_of = {v: i for i, v in enumerate(jaxpr.invars[:num_leaves])}
  uses: dict[Any, int] = {}
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if not isinstance(v, jex_core.Literal):
        uses[v] = uses.get(v, 0) + 1
  for v in jaxpr.outvars:
    if not isinstance(v, jex_core.Literal):
      uses[v] = uses.get(v, 0) + 1
  sites = {}
  for i, eqn in enumerate(jaxpr.eqns):
    if eqn.primitive.name != "dot_general":
      continue
    lhs, rhs = eqn.invars
    if isinstance(rhs, jex_core.Literal) or rhs not in leaf_of or uses.get(rhs, 0) != 1:
      continue
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lshape, rshape = lhs.aval.shape, rhs.aval.shape
    if len(rshape) != 2 or tuple(rc) != (0,) or tuple(lb) or tuple(rb):
      continue
    if not (len(lshape) == 1 or (len(lshape) == 2 and lshape[0] == 1)):
      continue
    if tuple(lc) != (len(lshape) - 1,):
      continue
    sites[i] = leaf_of[rhs]
  return sites


def _eval_with_taps(jaxpr, consts, args, sites, taps):
  """Evaluates ``jaxpr``; adds ``taps[i]`` to the output of each site eqn and records its lhs."""
  env: dict[Any, Any] = {}
  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]
  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  activations = {}
  for i, eqn in enumerate(jaxpr.eqns):
    invals = [read(v) for v in eqn.invars]
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
      subfuns, bind_params = bind_params
    out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
    if i in sites:
      activations[i] = invals[0]
      out = out + taps[i]
    outs = out if eqn.primitive.multiple_results else [out]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars], activations


def _dense_sq_grad_sum(logits_fn, params, example):
  leaves, treedef = jax.tree.flatten(params)
  def single(leaves_, x):
    return logits_fn(jax.tree.unflatten(treedef, leaves_), x[None])[0]
  abstract = [jax.ShapeDtypeStruct(jnp.shape(l), jnp.result_type(l)) for l in leaves]
  closed = jax.make_jaxpr(single)(
      abstract, jax.ShapeDtypeStruct(example.shape, example.dtype))
  jaxpr = closed.jaxpr
  if len(jaxpr.outvars) != 1:
    raise _NoDenseSites()
  sites = _dense_sites(jaxpr, len(leaves))
  if not sites:
    raise _NoDenseSites()
  covered = set(sites.values())
  rest = [i for i in range(len(leaves)) if i not in covered]
  out_avals = {i: jaxpr.eqns[i].outvars[0].aval for i in sites}

  def per_example_loss(rest_vals, taps, all_leaves, x, y):
    full = list(all_leaves)
    for j, i in enumerate(rest):
      full[i] = rest_vals[j]
    (logits,), acts = _eval_with_taps(jaxpr, closed.consts, full + [x], sites, taps)
    return _xent(logits, y), acts

  grads_fn = jax.vmap(jax.grad(per_example_loss, argnums=(0, 1), has_aux=True),
                      in_axes=(None, 0, None, 0, 0))

  def sq_grad_sum(params_, xb, yb, wb):
    all_leaves = jax.tree.leaves(params_)
    b = xb.shape[0]
    taps = {i: jnp.zeros((b,) + aval.shape, aval.dtype) for i, aval in out_avals.items()}
    rest_vals = [lax.stop_gradient(all_leaves[i]) for i in rest]
    frozen = [lax.stop_gradient(l) for l in all_leaves]
    (g_rest, g_taps), acts = grads_fn(rest_vals, taps, frozen, xb, yb)
    out = [None] * len(all_leaves)
    for i, leaf_idx in sites.items():
      a = acts[i].reshape(b, -1).astype(jnp.float32)
      d = g_taps[i].reshape(b, -1).astype(jnp.float32)
      out[leaf_idx] = jnp.dot((a * a * wb[:, None]).T, d * d,
                              precision=lax.Precision.HIGHEST)
    for j, i in enumerate(rest):
      out[i] = jnp.tensordot(wb, jnp.square(g_rest[j].astype(jnp.float32)), axes=1)
    return jax.tree.unflatten(treedef, out)
  return sq_grad_sum
