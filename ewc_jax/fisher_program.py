r"""The compiled programs behind :func:`ewc_jax.fisher_diagonal` and its streaming forms.

**Compile once.** Every call traces the user's function for one example into a jaxpr (cheap: a
few tens of milliseconds for a transformer) and looks its program up by *the traced computation*:
the jaxpr's text (every primitive, parameter, shape and dtype), the shapes and dtypes of the data
and the static settings (kind, batch size, method, masks, reduction, which optional arguments
were given). Arrays the function closes over (BatchNorm statistics, a frozen head, an NNX graph's
other state) are hoisted out of the jaxpr and passed to the program as arguments, so a new value
(or a new lambda around the same model) reuses the compiled program, eagerly and under ``jit``.
What compiles again: another model or model code, other shapes or dtypes (a smaller last batch:
the streaming forms pad it), another kind/batch size/setting, or a function whose jaxpr holds a
Python object printed by identity (a callback, a custom derivative rule made anew on every call).
The cache holds the most recent :data:`MAX_PROGRAMS` programs of the process.

The per-example machinery is ``ewc_jax.per_example``; the likelihoods:

* categorical (``logits_fn``): the row's loss is ``scale · Σ_p m_p · CE(out_p, y_p)`` over its
  label positions p (one for ``[B, C]`` logits; ``[B, ..., C]`` for sequences), ``m`` the label
  mask and ``scale`` 1 (``reduction="sum"``) or ``1 / Σ_p m_p`` (``"mean"``);
* any negative log-likelihood (``nll_fn``): the row's loss is what ``nll_fn`` returns for it.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ewc_jax import misuse
from ewc_jax import per_example

MAX_PROGRAMS = 64
# Under jit on CPU, the batches of a model with convolutions are unrolled up to this many: XLA:CPU
# runs convolutions inside a while loop ~2.5x slower (ResNet-18, 2 batches of 128: 4.2 s in a
# lax.scan, 1.7 s unrolled); more batches keep the loop (compile time grows with the unroll).
MAX_UNROLL = 8


class Traced(NamedTuple):
  """One call's function traced for one example (see the module docstring).

  Attributes:
    closed: the ClosedJaxpr of ``single(leaves, example)`` (consts: what the function closes
      over), not inlined.
    key: the text that identifies the computation (None: cannot be cached).
    out_shape / out_dtype: the single example's output.
    leaves / treedef: ``params`` flattened (NNX Variables kept as in ``params``).
    plain_treedef / paths / shapes: of ``params`` without NNX Variables.
  """
  closed: Any
  key: str | None
  out_shape: tuple
  out_dtype: Any
  leaves: list
  treedef: Any
  plain_treedef: Any
  paths: list
  shapes: list


def trace(fn: Callable, params: Any, example: Any, plain: Any, what: str) -> Traced:
  """Traces ``fn(params, example[None])[0]`` (``what`` names ``fn`` in errors)."""
  flat_plain, plain_treedef = jax.tree_util.tree_flatten_with_path(plain)
  leaves, treedef = jax.tree.flatten(params)
  if len(leaves) != len(flat_plain):
    raise ValueError("`params` holds NNX Variables whose value is not a single array.")
  paths = [jax.tree_util.keystr(p) for p, _ in flat_plain]
  shapes = [tuple(np.shape(l)) for l in leaves]

  def single(leaf_vals, x):
    out = fn(jax.tree.unflatten(treedef, leaf_vals), jax.tree.map(lambda a: a[None], x))
    misuse.check_output(out, what)
    if not out.shape or out.shape[0] != 1:
      raise ValueError(
          f"`{what}` must return its batch axis first ([B, ...]), but for a batch of 1 example "
          f"it returned shape {tuple(out.shape)}.")
    return out[0]

  abstract = [jax.ShapeDtypeStruct(jnp.shape(l), jnp.result_type(l)) for l in leaves]
  ex = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), example)
  closed = misuse.traced_call(lambda: jax.make_jaxpr(single)(abstract, ex), what)
  out = closed.out_avals[0]
  return Traced(closed, _computation_key(closed), tuple(out.shape), out.dtype, leaves, treedef,
                plain_treedef, paths, shapes)


def _computation_key(closed) -> str | None:
  """The jaxpr's text plus a digest of the constants nested jaxprs carry (their text shows only
  their shapes); None when such a constant is not concrete."""
  digest = hashlib.sha256()
  stack = [closed.jaxpr]
  while stack:
    jaxpr = stack.pop()
    for eqn in jaxpr.eqns:
      for value in eqn.params.values():
        for sub in (value if isinstance(value, (tuple, list)) else (value,)):
          inner = getattr(sub, "jaxpr", None)
          if inner is None or not hasattr(inner, "eqns"):
            continue
          for c in getattr(sub, "consts", ()):
            if isinstance(c, jax.core.Tracer):
              return None
            arr = np.asarray(c)
            digest.update(str((arr.shape, arr.dtype)).encode())
            digest.update(arr.tobytes())
          stack.append(inner)
  return str(closed.jaxpr) + digest.hexdigest()


class _Cache:
  """A bounded, thread-safe most-recently-used map from keys to built programs."""

  def __init__(self, size: int):
    self._size = size
    self._items: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def get(self, key, build: Callable[[], Any]):
    if key is None:
      return build()
    with self._lock:
      if key in self._items:
        self._items.move_to_end(key)
        return self._items[key]
    value = build()
    with self._lock:
      self._items[key] = value
      while len(self._items) > self._size:
        self._items.popitem(last=False)
    return value


PROGRAMS = _Cache(MAX_PROGRAMS)


class Likelihood(NamedTuple):
  """How a row's loss is read from the single-example output ``out``.

  ``categorical``: ``out`` is ``[*P, C]`` logits, the targets ``(labels [*P], mask [*P],
  scale [])``; otherwise ``out`` is the row's negative log-likelihood and there is no target.
  """
  categorical: bool
  reduction: str = "sum"


def row_loss(lik: Likelihood) -> Callable:
  """``loss(out, target) -> scalar`` of one row."""
  if not lik.categorical:
    return lambda out, target: out.astype(jnp.float32)

  def loss(out, target):
    labels, mask, scale = target
    ce = optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), labels)
    return scale * jnp.sum(mask * ce)
  return loss


def row_scale(mask: jax.Array, reduction: str) -> jax.Array:
  """Per-row factor of the loss: 1, or 1 / (number of unmasked positions) for ``"mean"``."""
  if reduction == "sum":
    return jnp.ones(mask.shape[:1], jnp.float32)
  count = jnp.sum(mask.reshape(mask.shape[0], -1), axis=1)
  return 1.0 / jnp.maximum(count, 1.0)


class Rows(NamedTuple):
  """A call's rows (``[N, ...]``, or one batch's ``[B, ...]``): the inputs (a pytree) and their
  optional labels, label mask and row weights (None: the defaults of the program)."""
  inputs: Any
  labels: Any = None
  lmask: Any = None
  weights: Any = None


class Spec(NamedTuple):
  """Static settings of a program (part of its cache key). ``shardings``: per leaf, the
  ``NamedSharding`` of a parameter sharded over several devices (its importance keeps it: every
  sum is constrained to it, never gathered whole), else None."""
  kind: str
  method: str
  active: tuple
  lik: Likelihood
  num_args: int
  shardings: tuple = ()


def shardings_of(leaves: list) -> tuple:
  """Per leaf: its NamedSharding when it is a concrete array spread over several devices."""
  out = []
  for leaf in leaves:
    sharding = getattr(leaf, "sharding", None) if isinstance(leaf, jax.Array) and not isinstance(
        leaf, jax.core.Tracer) else None
    named = isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.device_set) > 1
    out.append(sharding if named else None)
  return tuple(out)


def _constrain(values: list, spec: Spec, only_active: bool = True) -> list:
  """``values`` (one per active leaf, or per leaf) constrained to the parameters' shardings."""
  if not any(s is not None for s in spec.shardings):
    return values
  shardings = [s for s, on in zip(spec.shardings, spec.active) if on or not only_active]
  return [v if s is None else jax.lax.with_sharding_constraint(v, s)
          for v, s in zip(values, shardings)]


def batch_program(traced: Traced, spec: Spec, sample_fn: Callable | None = None):
  """``(f, plan)``: ``f(args, extra, leaves, rows, key) -> ([S per active leaf], flags)``
  (``rows``: one batch's :class:`Rows`, every field given; ``extra``: the consts of
  ``sample_fn``, see :func:`as_function`) is one batch's summed contribution Σ_b w_b (∂ℓ_b/∂θ)² (kinds as in
  ``ewc_jax.fisher``); ``flags`` are ``[probabilities, labels out of range]`` seen in the batch
  (categorical only), and ``plan`` is ``(path, reason)`` per leaf."""
  flat = per_example.inline_calls(traced.closed)
  misuse.check_deterministic(flat, "logits_fn" if spec.lik.categorical else "nll_fn")
  loss = row_loss(spec.lik)
  sq, plan = per_example.make_sq_grad_sum(flat, spec.num_args, len(traced.leaves), loss,
                                          method=spec.method, active=spec.active)
  misuse.check_uses_params(plan, "logits_fn" if spec.lik.categorical else "nll_fn")

  def single(args, leaves, x):
    return jax.core.eval_jaxpr(flat.jaxpr, flat.consts, *args, *leaves, *jax.tree.leaves(x))[0]
  outputs = jax.vmap(single, in_axes=(None, None, 0))
  kind, reduction = spec.kind, spec.lik.reduction

  def active_only(values):
    return [v for v, on in zip(values, spec.active) if on]

  def with_active(leaves, values):
    full, it = list(leaves), iter(values)
    return [next(it) if on else x for x, on in zip(full, spec.active)]

  def categorical(args, extra, leaves, rows: Rows, key):
    del extra
    xb, labels, lmask, wb = rows
    scale = row_scale(lmask, reduction)
    labelled = kind in ("empirical", "batch_squared")
    if kind == "empirical":
      s, out = sq(args, leaves, xb, (labels, lmask, scale), wb)
      return active_only(s), _flags(out, labels, lmask, wb, labelled)
    if kind == "batch_squared":
      count = jnp.sum(wb)
      def mean_loss(ls):
        out = outputs(args, with_active(leaves, ls), xb)
        per_row = jax.vmap(loss)(out, (labels, lmask, scale))
        return jnp.sum(wb * per_row) / jnp.maximum(count, 1.0), out
      g, out = jax.grad(mean_loss, has_aux=True)(active_only(leaves))
      return ([count * jnp.square(x.astype(jnp.float32)) for x in g],
              _flags(lax.stop_gradient(out), labels, lmask, wb, labelled))
    logits = lax.stop_gradient(outputs(args, leaves, xb)).astype(jnp.float32)
    flags = _flags(logits, labels, lmask, wb, labelled)
    if kind in ("predicted", "sampled"):
      if kind == "predicted":
        y = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      else:
        y = jax.random.categorical(key, logits).astype(jnp.int32)
      return active_only(sq(args, leaves, xb, (y, lmask, scale), wb)[0]), flags
    # kind == "true": the exact expectation, one pass per (label position, class).
    b, c = logits.shape[0], logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1).reshape(b, -1, c)
    flat_mask = lmask.reshape(b, -1)
    positions = flat_mask.shape[1]
    def one(i, acc):
      p, k = i // c, i % c
      only = (jnp.arange(positions) == p).astype(jnp.float32)[None] * flat_mask
      yk = jnp.full(labels.shape, k, jnp.int32)
      s, _ = sq(args, leaves, xb, (yk, only.reshape(lmask.shape), scale), wb * probs[:, p, k])
      return [a + x for a, x in zip(acc, active_only(s))]
    zeros = [jnp.zeros(s, jnp.float32) for s in active_only(traced.shapes)]
    return lax.fori_loop(0, positions * c, one, zeros), flags

  def nll(args, extra, leaves, rows: Rows, key):
    xb, wb = rows.inputs, rows.weights
    if sample_fn is not None:
      xb = sample_fn(extra, list(leaves), xb, key)
    return active_only(sq(args, leaves, xb, jnp.zeros(wb.shape), wb)[0]), []

  out = categorical if spec.lik.categorical else nll
  out.convolutions = any(e.primitive.name == "conv_general_dilated" for e in flat.jaxpr.eqns)
  return out, plan


def _flags(logits, labels, lmask, wb, check_labels: bool):
  """``[looks like probabilities, labels out of range]`` over the batch's counted positions."""
  b, c = logits.shape[0], logits.shape[-1]
  counted = (wb[:, None] > 0) & (lmask.reshape(b, -1) > 0)              # [B, P]
  rows = logits.reshape(b, -1, c)
  prob_like = (jnp.min(rows, axis=-1) >= 0) & (jnp.abs(jnp.sum(rows, axis=-1) - 1) <= 1e-3)
  any_counted = jnp.any(counted)
  probs = any_counted & jnp.all(jnp.where(counted, prob_like, True)) & (c > 1)
  if not check_labels:
    return [probs, jnp.zeros((), bool)]
  y = labels.reshape(b, -1)
  bad = jnp.any(counted & ((y < 0) | (y >= c)))
  return [probs, bad]


def _defaults(out_shape, n, rows: Rows, key, categorical: bool):
  """The optional arguments' defaults, made inside the program (no eager op per call):
  ``(labels, lmask, weights, key)``."""
  _, labels, lmask, weights = rows
  positions = tuple(out_shape[:-1]) if categorical else ()
  labels = jnp.zeros((n,) + positions, jnp.int32) if labels is None else labels.astype(jnp.int32)
  lmask = (jnp.ones((n,) + positions, jnp.float32) if lmask is None
           else lmask.astype(jnp.float32))
  weights = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
  key = jax.random.key(0) if key is None else key  # unused by the deterministic kinds
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  return labels, lmask, weights, key


def _fill_masked(weights, n: int, *trees):
  """Masked-out rows take the values of a counted row: their weight is 0, but 0 * NaN = NaN (so
  garbage in padding, NaN or inf, would otherwise poison every sum)."""
  keep = weights > 0
  first = jnp.argmax(keep)
  def fill(a):
    return jnp.where(keep.reshape((n,) + (1,) * (a.ndim - 1)), a, a[first])
  return tuple(jax.tree.map(fill, t) for t in trees)


def data_program(batch_fn: Callable, spec: Spec, shapes: list, out_shape: tuple, n: int, *,
                 batch_size: int, has_mask: bool, normalize: bool, host_loop: bool = False):
  """``f(args, leaves, rows, key) -> ([F per active leaf], flags, [finite per active leaf])``
  over the ``n`` :class:`Rows` in batches of ``batch_size`` (the last one padded and masked).

  The batches run in a ``lax.scan`` (``f`` is then one jittable function), or, with
  ``host_loop`` (eager calls) for a model with convolutions, in a Python loop over one compiled
  step per batch: XLA:CPU runs convolutions inside a while loop ~3x slower than the same step
  alone (ResNet-18, 128 examples: 2.2 s against 0.77 s); the host loop costs one dispatch per
  batch.
  """
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  active_shapes = [s for s, on in zip(shapes, spec.active) if on]
  num_flags = 2 if spec.lik.categorical else 0

  def prepare(rows, key):
    inputs = rows.inputs
    labels, lmask, weights, key = _defaults(out_shape, n, rows, key, spec.lik.categorical)
    if has_mask:
      inputs, labels, lmask = _fill_masked(weights, n, inputs, labels, lmask)

    def batched(a, mode):
      a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), mode=mode)
      return a.reshape((num_batches, batch_size) + a.shape[1:])
    xs = jax.tree.map(lambda a: batched(a, "edge"), inputs)
    return (xs, batched(labels, "edge"), batched(lmask, "edge"), batched(weights, "constant"),
            key, jnp.sum(weights))

  def add(args, leaves, carry, batch, key):
    acc, flags = carry
    xb, yb, mb, wb, i = batch
    c, f = batch_fn(args, [], leaves, Rows(xb, yb, mb, wb), jax.random.fold_in(key, i))
    c = _constrain(c, spec)
    return [a + x for a, x in zip(acc, c)], [a | x for a, x in zip(flags, f)]

  def start():
    acc0 = _constrain([jnp.zeros(s, jnp.float32) for s in active_shapes], spec)
    return acc0, [jnp.zeros((), bool)] * num_flags

  def finish(acc, flags, total):
    denom = jnp.where(total > 0, total, jnp.nan)  # no counted row (traced masks): NaN, not 0
    if normalize:
      denom = denom * sum(int(np.prod(s, dtype=np.int64)) for s in active_shapes)
    values = _constrain([a / denom for a in acc], spec)
    return values, flags, [jnp.all(jnp.isfinite(v)) for v in values]

  if host_loop and getattr(batch_fn, "convolutions", False):
    prepare_jit = jax.jit(prepare)

    def step(args, leaves, carry, batch, key):
      return add(args, leaves, carry, batch, key)
    step_jit = jax.jit(step, donate_argnums=(2,))
    start_jit, finish_jit = jax.jit(start), jax.jit(finish)

    def run(args, leaves, rows, key):
      xs, ys, ms, ws, key, total = prepare_jit(rows, key)
      carry = start_jit()
      for i in range(num_batches):
        batch = (jax.tree.map(lambda a, i=i: a[i], xs), ys[i], ms[i], ws[i], np.int32(i))
        carry = step_jit(args, leaves, carry, batch, key)
      return finish_jit(*carry, total)
    return run

  def program(args, leaves, rows, key):
    xs, ys, ms, ws, key, total = prepare(rows, key)
    def body(carry, batch):
      return add(args, leaves, carry, batch, key), None
    unroll = (num_batches if getattr(batch_fn, "convolutions", False)
              and num_batches <= MAX_UNROLL and jax.default_backend() == "cpu" else 1)
    (acc, flags), _ = lax.scan(body, start(), (xs, ys, ms, ws, jnp.arange(num_batches)),
                               unroll=unroll)
    return finish(acc, flags, total)
  return jax.jit(program)


def update_program(batch_fn: Callable, spec: Spec, out_shape: tuple, n: int):
  """``f(args, extra, leaves, rows, key, (sums, count)) -> (sums, count, flags)``: one batch of
  ``n`` :class:`Rows` added to a running Fisher (every leaf's sum, in order, and the total row
  weight)."""
  def program(args, extra, leaves, rows, key, running):
    sums, count = running
    labels, lmask, weights, key = _defaults(out_shape, n, rows, key, spec.lik.categorical)
    xb, labels, lmask = _fill_masked(weights, n, rows.inputs, labels, lmask)
    values, flags = batch_fn(args, extra, leaves, Rows(xb, labels, lmask, weights), key)
    it = iter(_constrain(values, spec))
    sums = [s + next(it) if on else s for s, on in zip(sums, spec.active)]
    return sums, count + jnp.sum(weights), flags
  return program


def trace_sample(sample_fn: Callable, params: Any, batch: Any, key: Any) -> Traced:
  """``sample_fn(params, batch, key) -> batch`` traced (its consts hoisted, like the model's)."""
  leaves, treedef = jax.tree.flatten(params)
  abstract = [jax.ShapeDtypeStruct(jnp.shape(l), jnp.result_type(l)) for l in leaves]
  avals = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), batch)
  key_aval = jax.ShapeDtypeStruct(jnp.shape(key), key.dtype)

  def call(leaf_vals, b, k):
    out = sample_fn(jax.tree.unflatten(treedef, leaf_vals), b, k)
    if jax.tree.structure(out) != jax.tree.structure(b):
      raise ValueError("`sample_fn` must return a batch of the same structure as its input "
                       f"batch, got {jax.tree.structure(out)} for {jax.tree.structure(b)}.")
    for o, i in zip(jax.tree.leaves(out), jax.tree.leaves(b)):
      if jnp.shape(o) != jnp.shape(i):
        raise ValueError(f"`sample_fn` changed a batch leaf's shape from {jnp.shape(i)} to "
                         f"{jnp.shape(o)}.")
    return out
  closed = jax.make_jaxpr(call)(abstract, avals, key_aval)
  return Traced(closed, _computation_key(closed), (), None, leaves, treedef, None, [], [])


def as_function(sample: Traced) -> Callable:
  """``f(consts, leaves, batch, key) -> batch`` evaluating a :func:`trace_sample` jaxpr."""
  jaxpr = sample.closed.jaxpr

  def run(consts, leaves, batch, key):
    outs = jax.core.eval_jaxpr(jaxpr, consts, *leaves, *jax.tree.leaves(batch), key)
    return jax.tree.unflatten(jax.tree.structure(batch), outs)
  return run
