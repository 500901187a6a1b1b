r"""Diagonal Fisher / importance estimators: pure functions returning a pytree shaped like ``params``.

All estimators take ``logits_fn(params, x_batch) -> [B, C]`` (or ``[B, ..., C]`` for token-level
tasks) and data ``inputs [N, ...]`` (or a pytree of such arrays), ``labels [N]`` (``[N, ...]``,
integers in ``[0, C)``), optionally ``label_mask [N, ...]`` (0 = padding); ℓ(x, y; θ) =
−log softmax(logits_fn(θ, x))_y (a stable log-softmax, finite for huge logits). **One example is one
row**: its loss is the sum of ℓ over its unmasked label positions (``reduction="mean"``: their
mean). Data are processed in batches with a ``lax.scan``, the last partial batch padded and
masked, and every sum is accumulated in float32. The result is a mean over the N (unmasked) rows.
:func:`fisher_from_batches` streams batches from any iterable, :func:`fisher_accumulator` is the
same as a pure init/update/result triple for a user's own loop, and :func:`fisher_from_nll` takes
any per-example negative log-likelihood (regression, policies, ...).

Kinds (docs/maths.md):

* ``"empirical"`` (default): :math:`F_i = \frac1N \sum_n (\partial_i \ell(x_n, y_n))^2`,
  per-example gradients with the true labels.
* ``"true"``: :math:`F_i = \frac1N \sum_n \sum_c p_\theta(c|x_n)\,(\partial_i \ell(x_n, c))^2`,
  the exact expectation over the model's predictive distribution (C backward passes; for token
  positions, whose labels are independent given the inputs, Σ_t Σ_c p_tc (∂ℓ_t(c))²: C × T
  passes -- use ``"sampled"`` for language models).
* ``"sampled"``: one label :math:`y_n \sim p_\theta(\cdot|x_n)` per example (needs ``key``).
* ``"predicted"``: :math:`y_n = \arg\max_c p_\theta(c|x_n)` (Hsu et al. 2018; van de Ven & Tolias 2019).
* ``"batch_squared"`` (reference parity, *not* a Fisher):
  :math:`F_i = \frac1N \sum_b B_b\,(\partial_i L_b)^2` with :math:`L_b` the mean loss of batch b
  of size :math:`B_b` -- squares of means, so it depends on ``batch_size``. This is CLArena's
  estimator; ``normalize_by_num_params=True`` additionally divides by the number of parameters,
  as the seed reference did.

Per-example squared gradients, fast and exact (``ewc_jax.per_example``): ``jax.vmap(jax.grad)``
materialises B copies of every weight; instead each leaf takes an exact rule found in the jaxpr
of ``logits_fn`` (dense and multi-axis ``dot_general`` kernels, convolutions including grouped and
depthwise ones, embedding lookups, biases and normalisation scales, tied weights; also through
dtype casts: bf16 compute with f32 parameters). :func:`fisher_plan` shows which leaf takes which
path and why. ``method="vmap"`` uses ``vmap(grad)`` for every leaf.

Compiled once: an eager call traces ``logits_fn`` and reuses the program compiled for the same
traced computation, shapes and settings (``ewc_jax.fisher_program`` says what compiles again);
arrays ``logits_fn`` closes over are arguments of that program, not constants.

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
  [("['b']", 'elementwise'), ("['w']", 'dense')]

References:
  Kirkpatrick et al., 2017. Overcoming catastrophic forgetting in neural networks. PNAS.
  Martens, 2020. New insights and perspectives on the natural gradient method. JMLR.
  Kunstner, Balles & Hennig, 2019. Limitations of the empirical Fisher approximation. NeurIPS.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import fisher_program as prog
from ewc_jax import masks as masks_lib
from ewc_jax import misuse
from ewc_jax import per_example
from ewc_jax import validation
from ewc_jax import variables

PyTree = Any
LogitsFn = Callable[[PyTree, Any], jax.Array]

KINDS = ("empirical", "true", "sampled", "predicted", "batch_squared")
METHODS = ("auto", "vmap")
REDUCTIONS = ("sum", "mean")
LABELLED_KINDS = ("empirical", "batch_squared")


class LeafPlan(NamedTuple):
  """How :func:`fisher_diagonal` computes one leaf's per-example squared gradients.

  Attributes:
    path: the leaf's key path in ``params`` (``jax.tree_util.keystr``, NNX Variables dropped).
    shape: the leaf's shape.
    method: one of ``ewc_jax.per_example.PATHS`` (``"dense"``, ``"rows"``, ``"conv"``,
      ``"embed"``, ``"elementwise"``, ``"tied"``, ``"unused"``: exact fast paths; ``"vmap"``:
      exact ``vmap(grad)`` for this leaf) or ``"masked"`` (excluded by ``leaf_mask``: 0).
    reason: why (for ``"vmap"``: why no fast path applies).
  """
  path: str
  shape: tuple
  method: str
  reason: str


class _Setup(NamedTuple):
  traced: prog.Traced
  active: tuple
  inputs: PyTree
  n: int


def _check_settings(kind: str, method: str, reduction: str, batch_size: Any = 1) -> None:
  if kind not in KINDS:
    raise ValueError(f"`kind` must be one of {', '.join(KINDS)}, but got kind={kind!r}.")
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {', '.join(METHODS)}, but got method={method!r}.")
  if reduction not in REDUCTIONS:
    raise ValueError(f"`reduction` must be one of {', '.join(REDUCTIONS)}, but got "
                     f"reduction={reduction!r}.")
  if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
      or batch_size <= 0):
    raise ValueError(f"`batch_size` should be a positive integer, but got batch_size={batch_size!r}.")


def _setup(fn: Callable, params: PyTree, inputs: PyTree, leaf_mask, what: str) -> _Setup:
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
  inputs, n = _as_inputs(inputs)
  example = jax.tree.map(lambda a: a[0], inputs)
  traced = prog.trace(fn, params, example, plain, what)
  return _Setup(traced, tuple(active), inputs, n)


def _as_inputs(inputs: PyTree, name: str = "inputs") -> tuple[PyTree, int]:
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


def _categorical_targets(traced: prog.Traced, n: int, labels, label_mask, kind: str):
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


def _checked_targets(setup: _Setup, labels, label_mask, mask, kind: str, key):
  """``(labels, label_mask, row weights)`` of a categorical call, checked (see the callers)."""
  labels, label_mask, c = _categorical_targets(setup.traced, setup.n, labels, label_mask, kind)
  weights = _row_weights(mask, setup.n)
  if kind in LABELLED_KINDS:
    _check_labels(labels, weights, label_mask, c)
  if kind == "sampled" and key is None:
    raise ValueError("`key` (a PRNG key) is required for kind='sampled'.")
  return labels, label_mask, weights


def _row_weights(mask, n: int):
  if mask is None:
    return None
  mask = mask if isinstance(mask, jax.Array) else jnp.asarray(mask)
  if tuple(mask.shape) != (n,):
    raise ValueError(f"`mask` must have shape ({n},) to match `inputs`, got {tuple(mask.shape)}.")
  return mask


def _check_labels(labels, weights, lmask, num_classes: int) -> None:
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
      found = _labels_out_of_range(labels, weights, lmask, num_classes)
    count, row, value = (int(v) for v in found)
  if count:
    raise ValueError(
        f"`labels` must lie in [0, {num_classes}) for the {num_classes} logits of `logits_fn`, "
        f"but labels[{row}]={value} ({count} labels out of range; in domain-incremental "
        f"learning map global labels to the task's, e.g. label % {num_classes}).")


@functools.partial(jax.jit, static_argnums=3)
def _labels_out_of_range(labels, weights, lmask, num_classes: int):
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


def _raise_flags(flags, finite, paths, runtime_checks: bool, what: str) -> None:
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


def _assemble(traced: prog.Traced, active: tuple, values: list) -> PyTree:
  it = iter(values)
  out = [next(it) if on else jnp.zeros(s, jnp.float32) for s, on in zip(traced.shapes, active)]
  return jax.tree.unflatten(traced.plain_treedef, out)


def _active_paths(traced: prog.Traced, active: tuple) -> list:
  return [p for p, on in zip(traced.paths, active) if on]


def fisher_diagonal(
    logits_fn: LogitsFn,
    params: PyTree,
    inputs: PyTree,
    labels: jax.Array | None = None,
    label_mask: jax.Array | None = None,
    *,
    kind: str = "empirical",
    batch_size: int = 256,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
    normalize_by_num_params: bool = False,
    method: str = "auto",
    leaf_mask: masks_lib.LeafMask = None,
    reduction: str = "sum",
    runtime_checks: bool = True,
) -> PyTree:
  """Diagonal importance of ``params`` on ``(inputs, labels)``; see the module docstring.

  Args:
    logits_fn: ``logits_fn(params, x_batch) -> [B, C]`` logits (``[B, ..., C]`` with token-level
      labels), in evaluation mode (BatchNorm on its running statistics, dropout off: close over
      ``batch_stats``, use ``train=False``/``deterministic=True``, NNX ``model.eval()``). Close
      over anything that is not to be weighed (e.g. the task's head). Logits, not
      probabilities (refused), and the logits alone (not linen's ``(logits, updates)``).
    params: the parameters to weigh: any pytree of float arrays, an ``nnx.State`` included (not
      the module, not linen's whole variables: both refused with the fix).
    inputs: ``[N, ...]`` inputs, or a pytree (e.g. a dict) of such arrays, all with the same N;
      ``logits_fn`` receives batches of the same form.
    labels: ``[N]`` (``[N, ...]`` for token-level logits) integer labels in ``[0, C)``;
      required for ``"empirical"`` and ``"batch_squared"`` (ignored by the other kinds).
    label_mask: optional ``[N, ...]`` 0/1 weights of the label positions (0: padding, ignored).
    kind: one of ``"empirical" | "true" | "sampled" | "predicted" | "batch_squared"``.
    batch_size: rows per scan step (for ``batch_squared`` it changes the result).
    key: PRNG key, required for ``"sampled"``.
    mask: optional ``[N]`` 0/1 row weights; masked-out rows are ignored and not counted in N.
      This lets one compiled program serve data sets of different sizes padded to one shape.
    normalize_by_num_params: divide by the number of weighed scalars (seed parity).
    method: ``"auto"`` (exact fast paths where they apply, ``vmap(grad)`` elsewhere) or
      ``"vmap"``.
    leaf_mask: which leaves to weigh (see ``ewc_jax.masks``: a bool pytree, a prefix of one,
      or ``mask_fn(params)``); the others get importance 0 at no cost.
    reduction: a row's loss over its label positions: ``"sum"`` (its log-likelihood) or
      ``"mean"``.
    runtime_checks: under ``jit``, misuse only visible in the values (probabilities for
      logits, labels out of range) raises through a host callback; ``False`` leaves the callback
      out (e.g. for programs to be serialised). Eager calls always check.

  Returns:
    A float32 pytree with the structure and shapes of ``params`` (NNX Variables replaced by
    arrays).

  Raises:
    ValueError: bad arguments (names the argument and value); see ``ewc_jax.misuse``.

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
  _check_settings(kind, method, reduction, batch_size)
  setup = _setup(logits_fn, params, inputs, leaf_mask, "logits_fn")
  traced, n = setup.traced, setup.n
  labels, label_mask, weights = _checked_targets(setup, labels, label_mask, mask, kind, key)
  consts = traced.closed.consts
  spec = prog.Spec(kind, method, setup.active, prog.Likelihood(True, reduction), len(consts),
                   prog.shardings_of(traced.leaves))
  settings = ("diagonal", spec, n, int(batch_size), weights is not None,
              bool(normalize_by_num_params))

  host_loop = not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(
      (consts, traced.leaves, setup.inputs, labels, label_mask, weights, key)))

  def build():
    batch_fn, _ = prog.batch_program(traced, spec)
    return prog.data_program(batch_fn, spec, traced.shapes, traced.out_shape, n,
                             int(batch_size), weights is not None,
                             bool(normalize_by_num_params), host_loop)
  program = prog.PROGRAMS.get(
      None if traced.key is None else (traced.key, settings, host_loop), build)
  values, flags, finite = program(list(consts), traced.leaves, setup.inputs, labels, label_mask,
                                  weights, key)
  _raise_flags(flags, finite, _active_paths(traced, setup.active), runtime_checks, "logits_fn")
  return _assemble(traced, setup.active, values)


def fisher_plan(logits_fn: LogitsFn, params: PyTree, inputs: PyTree, *, method: str = "auto",
                leaf_mask: masks_lib.LeafMask = None) -> tuple[LeafPlan, ...]:
  """Which path :func:`fisher_diagonal` takes for each leaf of ``params``, and why.

  Traces ``logits_fn`` for one example (abstractly: nothing is computed). Same arguments as
  :func:`fisher_diagonal` (only the first example of ``inputs`` is looked at). Works for
  :func:`fisher_from_nll`'s ``nll_fn`` too.

  Example::

    >>> import jax.numpy as jnp
    >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w1"].T    # w1 used twice: tied
    >>> [l.method for l in fisher_plan(fn, {"w1": jnp.ones((3, 3))}, jnp.ones((2, 3)))]
    ['tied']
  """
  _check_settings("empirical", method, "sum")
  setup = _setup(logits_fn, params, inputs, leaf_mask, "logits_fn")
  flat = per_example.inline_calls(setup.traced.closed)
  _, plan = per_example.make_sq_grad_sum(
      flat, len(setup.traced.closed.consts), len(setup.traced.leaves), lambda out, t: out,
      method=method, active=setup.active)
  return tuple(LeafPlan(path, tuple(shape), m, why)
               for path, shape, (m, why) in zip(setup.traced.paths, setup.traced.shapes, plan))


def num_parameters(params: PyTree) -> int:
  """Total number of scalars in ``params``."""
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(params)))


class FisherState(NamedTuple):
  """A running Fisher: ``sums`` (Σ over rows of w·(∂ℓ/∂θ)², float32, like params) and ``count``
  (Σ of the row weights)."""
  sums: PyTree
  count: jax.Array


class FisherAccumulator(NamedTuple):
  """Pure ``init`` / ``update`` / ``result`` functions (optax style) of a streaming Fisher.

  ``init(params) -> FisherState``; ``update(state, params, inputs, labels=None,
  label_mask=None, *, key=None, mask=None) -> FisherState`` adds one batch (jittable: call it
  inside your own jitted loop); ``result(state) -> pytree`` is the mean over the rows seen.
  """
  init: Callable[..., FisherState]
  update: Callable[..., FisherState]
  result: Callable[[FisherState], PyTree]


def fisher_accumulator(logits_fn: LogitsFn, *, kind: str = "empirical", method: str = "auto",
                       leaf_mask: masks_lib.LeafMask = None, reduction: str = "sum",
                       normalize_by_num_params: bool = False,
                       runtime_checks: bool = True) -> FisherAccumulator:
  """The Fisher of :func:`fisher_diagonal` as an accumulator over batches (settings as there).

  Summing batch by batch equals :func:`fisher_diagonal` on the concatenated rows (for
  ``"sampled"`` the draws differ: each update takes its own ``key``; ``"batch_squared"``
  depends on the batches, as it does on ``batch_size``). Memory: one batch at a time.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> fn = lambda p, x: x @ p["w"]
    >>> p = {"w": jnp.zeros((1, 2))}
    >>> acc = fisher_accumulator(fn)
    >>> state = acc.init(p)
    >>> step = jax.jit(acc.update)                      # inside your own loop
    >>> for x, y in [(jnp.array([[1.0]]), jnp.array([0])), (jnp.array([[2.0]]), jnp.array([1]))]:
    ...   state = step(state, p, x, y)
    >>> acc.result(state)["w"].tolist()                 # = fisher_diagonal on both rows
    [[0.625, 0.625]]
  """
  _check_settings(kind, method, reduction)
  lik = prog.Likelihood(True, reduction)

  def init(params):
    misuse.check_params(params, "params")
    plain = variables.as_arrays(params)
    return FisherState(jax.tree.map(_zeros_like, plain),
                       jnp.zeros((), jnp.float32))

  def update(state, params, inputs, labels=None, label_mask=None, *, key=None, mask=None):
    setup = _setup(logits_fn, params, inputs, leaf_mask, "logits_fn")
    labels, lmask, weights = _checked_targets(setup, labels, label_mask, mask, kind, key)
    return _update(setup.traced, setup, lik, kind, method, state, labels, lmask, weights, key,
                   runtime_checks, "logits_fn")

  def result(state):
    return _result(state, leaf_mask, normalize_by_num_params)
  return FisherAccumulator(init, update, result)


def _zeros_like(x):
  """float32 zeros shaped (and, for a concrete array, sharded) like ``x``."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    return jnp.zeros_like(x, dtype=jnp.float32)
  return jnp.zeros(jnp.shape(x), jnp.float32)


def _update(traced, setup, lik, kind, method, state, labels, lmask, weights, key,
            runtime_checks, what, sample=None):
  consts = list(traced.closed.consts)
  extra = [] if sample is None else list(sample.closed.consts)
  spec = prog.Spec(kind, method, setup.active, lik, len(consts), prog.shardings_of(traced.leaves))
  settings = ("batch", spec, setup.n, None if sample is None else sample.key)

  def build():
    sample_fn = None if sample is None else prog.as_function(sample)
    batch_fn, _ = prog.batch_program(traced, spec, sample_fn)
    return jax.jit(prog.update_program(batch_fn, spec, traced.out_shape, setup.n))
  uncached = traced.key is None or (sample is not None and sample.key is None)
  program = prog.PROGRAMS.get(None if uncached else (traced.key, settings), build)
  sums = jax.tree.leaves(state.sums)
  if len(sums) != len(traced.shapes):
    raise ValueError(f"`state` holds {len(sums)} leaves but `params` has {len(traced.shapes)}: "
                     f"make it with init(params) of the same parameters.")
  values, count, flags = program(consts, extra, traced.leaves, setup.inputs, labels, lmask,
                                 weights, key, sums, state.count)
  _raise_flags(flags, [], [], runtime_checks, what)
  return FisherState(jax.tree.unflatten(jax.tree.structure(state.sums), values), count)


def _result(state: FisherState, leaf_mask, normalize: bool) -> PyTree:
  denom = jnp.maximum(state.count, 1.0)
  if normalize:
    active = masks_lib.resolve(leaf_mask, state.sums)
    denom = denom * sum(int(np.prod(np.shape(x), dtype=np.int64))
                        for x, on in zip(jax.tree.leaves(state.sums), active) if on)
  return jax.tree.map(lambda s: s / denom, state.sums)


def _batches(batches: Iterable, name: str):
  if isinstance(batches, (np.ndarray, jax.Array, dict)) or not hasattr(batches, "__iter__"):
    raise ValueError(
        f"`{name}` must be an iterable of batches (a list, a generator, a tf.data or grain "
        f"iterator), got {type(batches).__name__}: wrap one in-memory batch as [batch].")
  return iter(batches)


def _leading(tree: PyTree, name: str) -> int:
  return _as_inputs(tree, name)[1]


def _pad_rows(tree: PyTree, size: int) -> PyTree:
  """Rows appended by repeating the last one (weight 0), up to ``size``."""
  def pad(a):
    a = a if isinstance(a, jax.Array) else jnp.asarray(a)
    extra = size - a.shape[0]
    return a if extra == 0 else jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)])
  return jax.tree.map(pad, tree)


def _stream(batches: Iterable, name: str, max_examples, update_one: Callable):
  """Feeds each batch, padded to the first batch's size, to ``update_one(batch, weights, i)``;
  returns the number of rows taken."""
  if max_examples is not None and (isinstance(max_examples, bool) or
                                   not isinstance(max_examples, (int, np.integer)) or
                                   max_examples <= 0):
    raise ValueError(f"`max_examples` should be a positive integer or None, got "
                     f"max_examples={max_examples!r}.")
  seen, size = 0, None
  for i, batch in enumerate(_batches(batches, name)):
    b = _leading(batch, f"{name}[{i}]")
    if size is None:
      size = b
    take = b if max_examples is None else min(b, max_examples - seen)
    if b < size:
      batch = _pad_rows(batch, size)
    rows = max(size, b)
    weights = (np.arange(rows) < take).astype(np.float32)
    update_one(batch, jnp.asarray(weights), i)
    seen += take
    if max_examples is not None and seen >= max_examples:
      break
  if seen == 0:
    raise ValueError(f"`{name}` gave no examples.")
  return seen


def fisher_from_batches(logits_fn: LogitsFn, params: PyTree, batches: Iterable, *,
                        kind: str = "empirical", key: jax.Array | None = None,
                        max_examples: int | None = None, method: str = "auto",
                        leaf_mask: masks_lib.LeafMask = None, reduction: str = "sum",
                        normalize_by_num_params: bool = False,
                        runtime_checks: bool = True) -> PyTree:
  """:func:`fisher_diagonal` over an iterable of ``(inputs, labels[, label_mask])`` batches.

  Any iterable of unknown length (NumPy arrays, tf.data or grain iterators); the result equals
  :func:`fisher_diagonal` on the concatenated rows, in memory one batch at a time (a smaller
  last batch is padded and masked, so one program serves every batch). ``max_examples``: the
  Fisher of the first rows only (a subset or a proxy data set). Other arguments as in
  :func:`fisher_diagonal`; ``"sampled"`` draws with ``fold_in(key, batch index)``.

  Example::

    >>> import jax.numpy as jnp
    >>> fn = lambda p, x: x @ p["w"]
    >>> data = [(jnp.array([[1.0]]), jnp.array([0])), (jnp.array([[2.0]]), jnp.array([1]))]
    >>> fisher_from_batches(fn, {"w": jnp.zeros((1, 2))}, data)["w"].tolist()
    [[0.625, 0.625]]
  """
  acc = fisher_accumulator(logits_fn, kind=kind, method=method, leaf_mask=leaf_mask,
                           reduction=reduction, normalize_by_num_params=normalize_by_num_params,
                           runtime_checks=runtime_checks)
  if kind == "sampled" and key is None:
    raise ValueError("`key` (a PRNG key) is required for kind='sampled'.")
  state = [acc.init(params)]

  def update_one(batch, weights, i):
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
      raise ValueError(f"`batches[{i}]` must be (inputs, labels) or (inputs, labels, "
                       f"label_mask), got {type(batch).__name__}.")
    k = None if key is None else jax.random.fold_in(key, i)
    state[0] = acc.update(state[0], params, *batch, key=k, mask=weights)
  _stream(batches, "batches", max_examples, update_one)
  return acc.result(state[0])


def fisher_from_nll(nll_fn: Callable[[PyTree, Any], jax.Array], params: PyTree,
                    batches: Iterable, *, sample_fn: Callable | None = None,
                    key: jax.Array | None = None, num_samples: int = 1,
                    max_examples: int | None = None, method: str = "auto",
                    leaf_mask: masks_lib.LeafMask = None, runtime_checks: bool = True) -> PyTree:
  r"""Diagonal Fisher of any likelihood: :math:`F = \frac1N \sum_n (\nabla_\theta \ell_n)^2`.

  Args:
    nll_fn: ``nll_fn(params, batch) -> [B]``: each row's negative log-likelihood ℓ_n (e.g.
      Gaussian regression ``0.5 * ((pred - y) / σ)²``, a policy's ``-log π(a|s)``, a sequence's
      summed token loss). ``batch`` is any pytree of ``[B, ...]`` arrays.
    params: as in :func:`fisher_diagonal`.
    batches: an iterable of such batches (unknown length; one batch in memory at a time).
    sample_fn: optional ``sample_fn(params, batch, key) -> batch`` returning the batch with its
      targets drawn from the model: the true Fisher by Monte Carlo (``num_samples`` draws per
      row, averaged); without it, the empirical Fisher of the batch's own targets.
    key: PRNG key, required with ``sample_fn``.
    num_samples: draws per row with ``sample_fn``.
    max_examples: as in :func:`fisher_from_batches`.
    method: as in :func:`fisher_from_batches`.
    leaf_mask: as in :func:`fisher_from_batches`.
    runtime_checks: as in :func:`fisher_from_batches`.

  Example (a Gaussian regression: ℓ = ½ (w·x − y)², ∂ℓ/∂w = (w·x − y) x)::

    >>> import jax.numpy as jnp
    >>> nll = lambda p, b: 0.5 * (b["x"] @ p["w"] - b["y"]) ** 2
    >>> batch = {"x": jnp.array([[1.0], [2.0]]), "y": jnp.array([1.0, 1.0])}
    >>> fisher_from_nll(nll, {"w": jnp.zeros(1)}, [batch])["w"].tolist()   # (1 + 4) / 2
    [2.5]
  """
  _check_settings("empirical", method, "sum")
  if sample_fn is not None and key is None:
    raise ValueError("`key` (a PRNG key) is required with `sample_fn`.")
  if (isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer))
      or num_samples < 1):
    raise ValueError(f"`num_samples` should be a positive integer, got {num_samples!r}.")
  lik = prog.Likelihood(False)
  misuse.check_params(params, "params")
  plain = variables.as_arrays(params)
  state = [FisherState(jax.tree.map(_zeros_like, plain),
                       jnp.zeros((), jnp.float32))]

  def update_one(batch, weights, i):
    setup = _setup(nll_fn, params, batch, leaf_mask, "nll_fn")
    if setup.traced.out_shape != ():
      raise ValueError(f"`nll_fn` must return one negative log-likelihood per row, [B], but for "
                       f"a batch of 1 it returned shape (1, {', '.join(map(str, setup.traced.out_shape))}).")
    sample = None
    if sample_fn is not None:
      sample = prog.trace_sample(sample_fn, params, setup.inputs, key)
    for s in range(num_samples if sample_fn is not None else 1):
      k = None if key is None else jax.random.fold_in(key, i * num_samples + s)
      w = weights / (num_samples if sample_fn is not None else 1)
      state[0] = _update(setup.traced, setup, lik, "empirical", method, state[0], None, None,
                         w, k, runtime_checks, "nll_fn", sample)
  _stream(batches, "batches", max_examples, update_one)
  return _result(state[0], leaf_mask, False)
