r"""The Fisher of :func:`ewc_jax.fisher.fisher_diagonal` over a stream of batches.

:math:`F_i = \frac{1}{N} \sum_n w_n (\partial_i \ell_n)^2` summed batch by batch into a
:class:`FisherState` (float32 sums and the total row weight), one batch in memory at a time:
:func:`fisher_accumulator` (a pure init/update/result triple, optax style, for a user's own
loop), :func:`fisher_from_batches` (any iterable of ``(inputs, labels[, label_mask])``) and
:func:`fisher_from_nll` (any per-example negative log-likelihood: regression, policies, ...;
the true Fisher by Monte Carlo with ``sample_fn``). The kinds, settings and checks are those of
``ewc_jax.fisher`` (module docstring; Kirkpatrick et al. 2017, Martens 2020).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import fisher_checks as checks
from ewc_jax import fisher_program as prog
from ewc_jax import masks as masks_lib
from ewc_jax import misuse
from ewc_jax import validation
from ewc_jax import variables
from ewc_jax.fisher import LogitsFn

PyTree = Any


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
  checks.check_settings(kind, method, reduction)
  how = _How(kind, method, prog.Likelihood(True, reduction), runtime_checks, "logits_fn")

  def init(params):
    misuse.check_params(params, "params")
    plain = variables.as_arrays(params)
    return FisherState(jax.tree.map(_zeros_like, plain),
                       jnp.zeros((), jnp.float32))

  def update(state, params, inputs, labels=None, label_mask=None, *, key=None, mask=None):
    call = checks.setup_call(logits_fn, params, inputs, leaf_mask, "logits_fn")
    targets = checks.checked_targets(call, labels, label_mask, mask, kind, key)
    return _update(call, how, state, targets, key)

  def result(state):
    return _result(state, leaf_mask, normalize_by_num_params)
  return FisherAccumulator(init, update, result)


class _How(NamedTuple):
  """The settings of one accumulator's updates; ``what`` names the function in errors."""
  kind: str
  method: str
  likelihood: prog.Likelihood
  runtime_checks: bool
  what: str


def _zeros_like(x):
  """float32 zeros shaped (and, for a concrete array, sharded) like ``x``."""
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    return jnp.zeros_like(x, dtype=jnp.float32)
  return jnp.zeros(jnp.shape(x), jnp.float32)


def _update(call: checks.Setup, how: _How, state: FisherState, targets: checks.Targets, key,
            sample: prog.Traced | None = None) -> FisherState:
  """``state`` plus one batch (``call.inputs`` with ``targets``; ``sample`` draws the targets)."""
  traced = call.traced
  consts = list(traced.closed.consts)
  extra = [] if sample is None else list(sample.closed.consts)
  spec = prog.Spec(how.kind, how.method, call.active, how.likelihood, len(consts),
                   prog.shardings_of(traced.leaves))
  settings = ("batch", spec, call.n, None if sample is None else sample.key)

  def build():
    sample_fn = None if sample is None else prog.as_function(sample)
    batch_fn, _ = prog.batch_program(traced, spec, sample_fn)
    return jax.jit(prog.update_program(batch_fn, spec, traced.out_shape, call.n))
  uncached = traced.key is None or (sample is not None and sample.key is None)
  program = prog.PROGRAMS.get(None if uncached else (traced.key, settings), build)
  sums = jax.tree.leaves(state.sums)
  if len(sums) != len(traced.shapes):
    raise ValueError(f"`state` holds {len(sums)} leaves but `params` has {len(traced.shapes)}: "
                     f"make it with init(params) of the same parameters.")
  rows = prog.Rows(call.inputs, targets.labels, targets.label_mask, targets.weights)
  values, count, flags = program(consts, extra, traced.leaves, rows, key, (sums, state.count))
  checks.raise_flags(flags, [], [], how.runtime_checks, how.what)
  return FisherState(jax.tree.unflatten(jax.tree.structure(state.sums), values), count)


def _result(state: FisherState, leaf_mask, normalize: bool) -> PyTree:
  if validation.is_concrete(state.count) and validation.host_readable(state.count) and not (
      float(np.asarray(state.count)) > 0):
    raise ValueError("the Fisher has counted no example (every row or label position seen was "
                     "masked out): it is a mean over the counted rows, undefined over none.")
  denom = jnp.where(state.count > 0, state.count, jnp.nan)  # traced and empty: NaN, not 0
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
  return checks.as_inputs(tree, name)[1]


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
  state, labelled = [acc.init(params)], [False]  # labelled: some label position counted

  def update_one(batch, weights, i):
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
      raise ValueError(f"`batches[{i}]` must be (inputs, labels) or (inputs, labels, "
                       f"label_mask), got {type(batch).__name__}.")
    k = None if key is None else jax.random.fold_in(key, i)
    state[0] = acc.update(state[0], params, *batch, key=k, mask=weights)
    lmask = batch[2] if len(batch) == 3 else None
    labelled[0] = labelled[0] or lmask is None or not checks.counts_nothing(
        None, lmask, np.shape(lmask)[0])
  _stream(batches, "batches", max_examples, update_one)
  if not labelled[0] and validation.is_concrete(state[0].count):
    raise ValueError("every batch's `label_mask` counts no label position (all 0): the Fisher "
                     "over no label is undefined; give at least one nonzero label_mask entry.")
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
  checks.check_settings("empirical", method, "sum")
  if sample_fn is not None and key is None:
    raise ValueError("`key` (a PRNG key) is required with `sample_fn`.")
  if (isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer))
      or num_samples < 1):
    raise ValueError(f"`num_samples` should be a positive integer, got {num_samples!r}.")
  how = _How("empirical", method, prog.Likelihood(False), runtime_checks, "nll_fn")
  misuse.check_params(params, "params")
  plain = variables.as_arrays(params)
  state = [FisherState(jax.tree.map(_zeros_like, plain),
                       jnp.zeros((), jnp.float32))]

  def update_one(batch, weights, i):
    call = checks.setup_call(nll_fn, params, batch, leaf_mask, "nll_fn")
    if call.traced.out_shape != ():
      raise ValueError(f"`nll_fn` must return one negative log-likelihood per row, [B], but for "
                       f"a batch of 1 it returned shape (1, {', '.join(map(str, call.traced.out_shape))}).")
    sample = None
    if sample_fn is not None:
      sample = prog.trace_sample(sample_fn, params, call.inputs, key)
    for s in range(num_samples if sample_fn is not None else 1):
      k = None if key is None else jax.random.fold_in(key, i * num_samples + s)
      w = weights / (num_samples if sample_fn is not None else 1)
      state[0] = _update(call, how, state[0], checks.Targets(None, None, w), k, sample)
  _stream(batches, "batches", max_examples, update_one)
  return _result(state[0], leaf_mask, False)
