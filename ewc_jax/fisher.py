r"""Diagonal Fisher / importance estimators: pure functions returning a pytree shaped like ``params``.

All estimators take ``logits_fn(params, x_batch) -> [B, C]`` and data ``inputs [N, ...]`` (or a
pytree of such arrays), ``labels [N]`` (integers in ``[0, C)``); ℓ(x, y; θ) = −log softmax(logits_fn(θ, x))_y (a stable log-softmax, finite for
huge logits). Data are processed in batches with a ``lax.scan``, the last partial batch padded and
masked, and every sum is accumulated in float32. The result is a mean over the N (unmasked)
examples.

Kinds (docs/maths.md):

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

Per-example squared gradients, fast and exact (``ewc_jax.per_example``). ``jax.vmap(jax.grad)``
materialises B copies of every weight; instead, every Dense-style use ``z = a @ W`` and every
convolution kernel gets Σ_b w_b (∂ℓ_b/∂W)² from the layer's input and output gradient (one matmul,
or one batched matmul over the unfolded input patches), found model-agnostically in the jaxpr of
``logits_fn`` (also through dtype casts: bf16 compute with f32 parameters keeps the fast paths).
All other leaves (biases, norm scales, shared weights, grouped convolutions, ...) get exact
``vmap(grad)`` per-example gradients, cheap for small leaves. :func:`fisher_plan` shows which
leaf takes which path and why. ``method="vmap"`` uses ``vmap(grad)`` for every leaf.

Flax NNX: ``params`` may be an ``nnx.State`` (``nnx.split(model, nnx.Param)[1]`` or
``nnx.state(model, nnx.Param)``), live Variables included: ``logits_fn`` receives it in the same
form, and the result holds plain arrays (an ``nnx.State`` without Variable wrappers).

Example::

  >>> import jax, jax.numpy as jnp
  >>> fn = lambda p, x: x @ p["w"] + p["b"]                      # [B, C] logits
  >>> p = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 0, 1])
  >>> F = fisher_diagonal(fn, p, x, y)      # p(c|x) = 1/2: ∂ℓ/∂b = ±1/2, ∂ℓ/∂w = ±1/2
  >>> F["b"].tolist(), float(F["w"][0, 0])
  ([0.25, 0.25], 0.25)
  >>> [(leaf.path, leaf.method) for leaf in fisher_plan(fn, p, x)]
  [("['b']", 'vmap'), ("['w']", 'dense')]

References:
  Kirkpatrick et al., 2017. Overcoming catastrophic forgetting in neural networks. PNAS.
  Martens, 2020. New insights and perspectives on the natural gradient method. JMLR.
  Kunstner, Balles & Hennig, 2019. Limitations of the empirical Fisher approximation. NeurIPS.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ewc_jax import masks as masks_lib
from ewc_jax import per_example
from ewc_jax import validation
from ewc_jax import variables

PyTree = Any
LogitsFn = Callable[[PyTree, Any], jax.Array]

KINDS = ("empirical", "true", "sampled", "predicted", "batch_squared")
METHODS = ("auto", "vmap")
LABELLED_KINDS = ("empirical", "batch_squared")

_LOG = logging.getLogger(__name__)


class LeafPlan(NamedTuple):
  """How :func:`fisher_diagonal` computes one leaf's per-example squared gradients.

  Attributes:
    path: the leaf's key path in ``params`` (``jax.tree_util.keystr``, NNX Variables dropped).
    shape: the leaf's shape.
    method: ``"dense"`` (one matmul), ``"rows"`` / ``"conv"`` (one batched matmul),
      ``"vmap"`` (exact ``vmap(grad)``) or ``"masked"`` (excluded by ``leaf_mask``: importance 0).
    reason: why (for ``"vmap"``: why no fast path applies).
  """
  path: str
  shape: tuple
  method: str
  reason: str


class _Problem(NamedTuple):
  """``fisher_diagonal``'s inputs, checked and put in the form the estimators use."""
  batch_logits: Callable[[list, Any], jax.Array]   # (active leaves, x batch) -> [B, C]
  active_leaves: list
  active_index: list
  num_leaves: int
  plain_treedef: Any
  paths: list
  shapes: list
  inputs: PyTree
  n: int
  num_classes: int


def fisher_diagonal(
    logits_fn: LogitsFn,
    params: PyTree,
    inputs: PyTree,
    labels: jax.Array | None = None,
    *,
    kind: str = "empirical",
    batch_size: int = 256,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
    normalize_by_num_params: bool = False,
    method: str = "auto",
    leaf_mask: masks_lib.LeafMask = None,
) -> PyTree:
  """Diagonal importance of ``params`` on ``(inputs, labels)``; see the module docstring.

  Args:
    logits_fn: ``logits_fn(params, x_batch) -> [B, C]`` logits, in evaluation mode (BatchNorm
      on its running statistics, dropout off: close over ``batch_stats``, use
      ``train=False``/``deterministic=True``). Close over anything that is not to be weighted
      (e.g. the task's head). It must return the logits alone (not linen's
      ``(logits, updates)`` of ``mutable=``).
    params: the parameters to weigh: any pytree of float arrays, an ``nnx.State`` included.
    inputs: ``[N, ...]`` inputs, or a pytree (e.g. a dict) of such arrays, all with the same N;
      ``logits_fn`` receives batches of the same form.
    labels: ``[N]`` integer labels in ``[0, C)``; required for ``"empirical"`` and
      ``"batch_squared"`` (ignored by the other kinds). Their range is checked when concrete.
    kind: one of ``"empirical" | "true" | "sampled" | "predicted" | "batch_squared"``.
    batch_size: examples per scan step (for ``batch_squared`` it changes the result).
    key: PRNG key, required for ``"sampled"``.
    mask: optional ``[N]`` 0/1 row weights; masked-out rows are ignored and not counted in N.
      This lets one compiled program serve data sets of different sizes padded to one shape.
    normalize_by_num_params: divide by the number of weighed scalars (seed parity).
    method: ``"auto"`` (fast exact paths where they apply, ``vmap(grad)`` elsewhere) or
      ``"vmap"``.
    leaf_mask: which leaves to weigh (see ``ewc_jax.masks``: a bool pytree, a prefix of one,
      or ``mask_fn(params)``); the others get importance 0 at no cost.

  Returns:
    A float32 pytree with the structure and shapes of ``params`` (NNX Variables replaced by
    arrays).

  Raises:
    ValueError: bad arguments (names the argument and value); a ``logits_fn`` that does not
      return ``[B, C]`` logits; labels that are not integers, or (when concrete) outside
      ``[0, C)``; a non-finite result (when concrete).

  Example (empirical Fisher F_i = (1/N) Σ_n (∂ℓ_n/∂θ_i)², Kirkpatrick et al. 2017)::

    >>> import jax.numpy as jnp
    >>> fn = lambda p, x: x @ p["w"]
    >>> F = fisher_diagonal(fn, {"w": jnp.zeros((1, 2))}, jnp.array([[1.0], [2.0]]),
    ...                     jnp.array([0, 1]))
    >>> F["w"].tolist()                     # (1/2) Σ_n (x_n / 2)² = (1/4 + 1) / 2
    [[0.625, 0.625]]
    >>> fisher_diagonal(fn, {"w": jnp.zeros((1, 2))}, jnp.ones((2, 1)), jnp.array([0, 2]))
    Traceback (most recent call last):
    ValueError: `labels` must lie in [0, 2) for the 2 logits of `logits_fn`, but labels[1]=2 ...
  """
  if kind not in KINDS:
    raise ValueError(f"`kind` must be one of {', '.join(KINDS)}, but got kind={kind!r}.")
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {', '.join(METHODS)}, but got method={method!r}.")
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"`batch_size` should be a positive integer, but got batch_size={batch_size!r}.")
  prob = _prepare(logits_fn, params, inputs, leaf_mask)
  n, inputs = prob.n, prob.inputs
  weights = jnp.ones((n,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  if weights.shape != (n,):
    raise ValueError(f"`mask` must have shape ({n},) to match `inputs`, got {weights.shape}.")
  if labels is None:
    if kind in LABELLED_KINDS:
      raise ValueError(f"`labels` are required for kind={kind!r}.")
    labels = jnp.zeros((n,), jnp.int32)
  labels = jnp.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"`labels` must have shape ({n},) to match `inputs`, got {labels.shape}.")
  if kind in LABELLED_KINDS:
    _check_labels(labels, weights, prob.num_classes)
  if kind == "sampled" and key is None:
    raise ValueError("`key` (a PRNG key) is required for kind='sampled'.")
  if mask is not None:
    # Masked-out rows take the values of a counted row: their weight is 0, but 0 * NaN = NaN,
    # so garbage there (NaN/inf in padded data) would otherwise poison every sum.
    keep = weights > 0
    first = jnp.argmax(keep)
    inputs = jax.tree.map(
        lambda a: jnp.where(keep.reshape((n,) + (1,) * (a.ndim - 1)), a, a[first]), inputs)
    labels = jnp.where(keep, labels, labels[first])

  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  def batched(a, mode):
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), mode=mode)
    return a.reshape((num_batches, batch_size) + a.shape[1:])
  # Padding rows repeat the last row (zeros may lie outside the model's domain) with weight 0.
  xs = jax.tree.map(lambda a: batched(a, "edge"), inputs)
  ys = batched(labels.astype(jnp.int32), "edge")
  ws = batched(weights, "constant")

  active = prob.active_leaves
  if active:
    sq_grad_sum, _ = _make_sq_grad_sum(prob, method)
    contribution = _make_batch_contribution(prob.batch_logits, kind, sq_grad_sum)
    if key is None:
      key = jax.random.key(0)  # unused by the deterministic kinds

    def body(acc, batch):
      xb, yb, wb, i = batch
      c = contribution(active, xb, yb, wb, jax.random.fold_in(key, i))
      return [a + b for a, b in zip(acc, c)], None

    acc0 = [jnp.zeros(jnp.shape(p), jnp.float32) for p in active]
    acc, _ = lax.scan(body, acc0, (xs, ys, ws, jnp.arange(num_batches)))
    denom = jnp.maximum(jnp.sum(weights), 1.0)
    if normalize_by_num_params:
      denom = denom * num_parameters(active)
    acc = [a / denom for a in acc]
  out = [jnp.zeros(s, jnp.float32) for s in prob.shapes]
  for j, i in enumerate(prob.active_index):
    out[i] = acc[j]
  _check_finite_result(prob.paths, out)
  return jax.tree.unflatten(prob.plain_treedef, out)


def fisher_plan(logits_fn: LogitsFn, params: PyTree, inputs: PyTree, *, method: str = "auto",
                leaf_mask: masks_lib.LeafMask = None) -> tuple[LeafPlan, ...]:
  """Which path :func:`fisher_diagonal` takes for each leaf of ``params``, and why.

  Traces ``logits_fn`` for one example (abstractly: nothing is computed). Same arguments as
  :func:`fisher_diagonal` (only the first example of ``inputs`` is looked at).

  Example::

    >>> import jax.numpy as jnp
    >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w1"].T    # w1 used twice: shared
    >>> [l.method for l in fisher_plan(fn, {"w1": jnp.ones((3, 3))}, jnp.ones((2, 3)))]
    ['vmap']
  """
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {', '.join(METHODS)}, but got method={method!r}.")
  prob = _prepare(logits_fn, params, inputs, leaf_mask)
  plan = [("masked", "excluded by leaf_mask: importance 0")] * prob.num_leaves
  if prob.active_leaves:
    _, active_plan = _make_sq_grad_sum(prob, method)
    for j, i in enumerate(prob.active_index):
      plan[i] = active_plan[j]
  return tuple(LeafPlan(path, tuple(shape), m, why)
               for path, shape, (m, why) in zip(prob.paths, prob.shapes, plan))


def num_parameters(params: PyTree) -> int:
  """Total number of scalars in ``params``."""
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(params)))


def _as_inputs(inputs: PyTree) -> tuple[PyTree, int]:
  """``inputs`` as a pytree of arrays with one common leading axis N > 0: ``(inputs, N)``."""
  if isinstance(inputs, (np.ndarray, jax.Array)) or np.isscalar(inputs):
    inputs = jnp.asarray(inputs)
  flat = jax.tree_util.tree_flatten_with_path(inputs)[0]
  if not flat:
    raise ValueError(f"`inputs` must be a non-empty [N, ...] array or a pytree of them, got "
                     f"{type(inputs).__name__} with no array leaves.")
  n = None
  for path, leaf in flat:
    shape = np.shape(leaf)
    where = f"leaf {jax.tree_util.keystr(path)} of `inputs`" if path else "`inputs`"
    if len(shape) < 1 or shape[0] == 0:
      raise ValueError(f"{where} must be a non-empty [N, ...] array, got shape {shape}.")
    if n is None:
      n = shape[0]
    elif shape[0] != n:
      raise ValueError(f"every leaf of `inputs` must have the same leading size N, but {where} "
                       f"has {shape[0]} and the first has {n}.")
  return jax.tree.map(jnp.asarray, inputs), n


def _prepare(logits_fn, params, inputs, leaf_mask) -> _Problem:
  plain = variables.as_arrays(params)
  flat_plain, plain_treedef = jax.tree_util.tree_flatten_with_path(plain)
  leaves, treedef = jax.tree.flatten(params)
  if len(leaves) != len(flat_plain):
    raise ValueError("`params` holds NNX Variables whose value is not a single array.")
  paths = [jax.tree_util.keystr(p) for p, _ in flat_plain]
  shapes = [tuple(np.shape(l)) for l in leaves]
  active = masks_lib.resolve(leaf_mask, plain)
  for path, leaf, on in zip(paths, leaves, active):
    if on and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(
          f"`params` leaf {path} has dtype {jnp.result_type(leaf)}: only float leaves can be "
          f"weighed (for NNX pass nnx.state(model, nnx.Param), not nnx.state(model), which also "
          f"holds RNG keys and counters; or exclude the leaf with leaf_mask).")
  inputs, n = _as_inputs(inputs)
  active_index = [i for i, on in enumerate(active) if on]
  active_leaves = [leaves[i] for i in active_index]

  def batch_logits(active_vals, xb):
    full = list(leaves)
    for j, i in enumerate(active_index):
      full[i] = active_vals[j]
    return logits_fn(jax.tree.unflatten(treedef, full), xb)

  batch1 = jax.tree.map(lambda a: a[:1], inputs)
  out = jax.eval_shape(batch_logits, active_leaves, batch1)
  num_classes = _check_logits_shape(out)
  return _Problem(batch_logits, active_leaves, active_index, len(leaves), plain_treedef, paths,
                  shapes, inputs, n, num_classes)


def _check_logits_shape(out) -> int:
  """The class count C of ``logits_fn``'s output for a batch of 1; a clear error otherwise."""
  if isinstance(out, (tuple, list)) or not hasattr(out, "shape"):
    kind = f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else (
        f"a {type(out).__name__}")
    raise ValueError(
        f"`logits_fn` must return one [B, C] array of logits, but it returned {kind} (linen's "
        f"`apply(..., mutable=[...])` returns (logits, updates)): evaluate in eval mode without "
        f"`mutable` (BatchNorm on its running statistics), or return only the logits.")
  if len(out.shape) != 2 or out.shape[0] != 1:
    raise ValueError(
        f"`logits_fn` must return [B, C] logits (batch axis first), but for a batch of 1 "
        f"example it returned shape {tuple(out.shape)}" +
        (" (a 1-D output: keep the batch axis, and give a binary task 2 logits)."
         if len(out.shape) <= 1 else "."))
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(f"`logits_fn` must return float logits, but it returned dtype {out.dtype}.")
  return int(out.shape[1])


def _check_labels(labels, weights, num_classes: int) -> None:
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"`labels` must be integer class indices in [0, {num_classes}), but got "
                     f"dtype {labels.dtype}.")
  if not (validation.is_concrete(labels) and validation.is_concrete(weights)):
    return
  y, w = np.asarray(labels), np.asarray(weights)
  bad = np.flatnonzero((w > 0) & ((y < 0) | (y >= num_classes)))
  if bad.size:
    i = int(bad[0])
    raise ValueError(
        f"`labels` must lie in [0, {num_classes}) for the {num_classes} logits of `logits_fn`, "
        f"but labels[{i}]={int(y[i])} ({bad.size} labels out of range; in domain-incremental "
        f"learning map global labels to the task's, e.g. label % {num_classes}).")


def _check_finite_result(paths, out) -> None:
  for path, leaf in zip(paths, out):
    if not validation.is_concrete(leaf):
      return
    arr = np.asarray(leaf)
    if not np.all(np.isfinite(arr)):
      raise ValueError(
          f"fisher_diagonal produced non-finite importance at leaf {path}: `logits_fn` gives "
          f"non-finite logits or gradients on these inputs (check the data and parameters).")


def _xent(logits: jax.Array, label: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), label)


def _make_batch_contribution(batch_logits, kind, sq_grad_sum):
  """Returns ``f(leaves, xb, yb, wb, key) -> [summed contribution per leaf]`` of one batch."""
  if kind == "batch_squared":
    def batch_squared(leaves, xb, yb, wb, key):
      del key
      count = jnp.sum(wb)
      def mean_loss(ls):
        return jnp.sum(wb * _xent(batch_logits(ls, xb), yb)) / jnp.maximum(count, 1.0)
      g = jax.grad(mean_loss)(list(leaves))
      return [count * jnp.square(x.astype(jnp.float32)) for x in g]
    return batch_squared

  if kind == "empirical":
    return lambda leaves, xb, yb, wb, key: sq_grad_sum(leaves, xb, yb, wb)

  def model_labels(leaves, xb, yb, wb, key):
    logits = lax.stop_gradient(batch_logits(leaves, xb)).astype(jnp.float32)
    if kind == "predicted":
      return sq_grad_sum(leaves, xb, jnp.argmax(logits, axis=-1).astype(jnp.int32), wb)
    if kind == "sampled":
      return sq_grad_sum(leaves, xb, jax.random.categorical(key, logits).astype(jnp.int32), wb)
    probs = jax.nn.softmax(logits, axis=-1)  # kind == "true": exact expectation over classes
    def over_class(c, acc):
      yc = jnp.full(yb.shape, c, jnp.int32)
      return [a + b for a, b in zip(acc, sq_grad_sum(leaves, xb, yc, wb * probs[:, c]))]
    zeros = [jnp.zeros(jnp.shape(p), jnp.float32) for p in leaves]
    return lax.fori_loop(0, logits.shape[-1], over_class, zeros)
  return model_labels


def _make_sq_grad_sum(prob: _Problem, method: str):
  """``(f(leaves, xb, yb, wb) = [Σ_b w_b (∂ℓ_b/∂θ)² per leaf], [(path, reason)] per leaf)``."""
  def single(active_vals, x):
    return prob.batch_logits(active_vals, jax.tree.map(lambda a: a[None], x))[0]
  example = jax.tree.map(lambda a: a[0], prob.inputs)
  if method == "auto":
    try:
      return per_example.make_sq_grad_sum(single, _xent, prob.active_leaves, example)
    except Exception as err:  # pylint: disable=broad-except  # robust fallback, still exact
      _LOG.info("fast per-example paths unavailable (%s); using vmap(grad).", err)
      why = f"vmap(grad): the model's jaxpr could not be analysed ({type(err).__name__}: {err})"
  else:
    why = "vmap(grad): method='vmap'"
  return (per_example.make_vmap_sq_grad_sum(single, _xent),
          per_example.vmap_plan(len(prob.active_leaves), why))
