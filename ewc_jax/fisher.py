r"""Diagonal Fisher / importance estimators: pure functions returning a pytree shaped like ``params``.

All estimators take ``logits_fn(params, x_batch) -> [B, C]`` (or ``[B, ..., C]`` for token-level
tasks) and data ``inputs [N, ...]`` (or a pytree of such arrays), ``labels [N]`` (``[N, ...]``,
integers in ``[0, C)``), optionally ``label_mask [N, ...]`` (0 = padding); ℓ(x, y; θ) =
−log softmax(logits_fn(θ, x))_y (a stable log-softmax, finite for huge logits). **One example is one
row**: its loss is the sum of ℓ over its unmasked label positions (``reduction="mean"``: their
mean). Data are processed in batches with a ``lax.scan``, the last partial batch padded and
masked, and every sum is accumulated in float32. The result is a mean over the N (unmasked) rows.
The streaming forms live in ``ewc_jax.fisher_stream``: ``fisher_from_batches`` streams batches
from any iterable, ``fisher_accumulator`` is the same as a pure init/update/result triple for a
user's own loop, and ``fisher_from_nll`` takes any per-example negative log-likelihood
(regression, policies, ...). The arguments all of them accept are checked in
``ewc_jax.fisher_checks``.

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

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import fisher_checks as checks
from ewc_jax import fisher_program as prog
from ewc_jax import masks as masks_lib
from ewc_jax import per_example
from ewc_jax.fisher_checks import KINDS

PyTree = Any
LogitsFn = Callable[[PyTree, Any], jax.Array]

__all__ = ["KINDS", "LeafPlan", "LogitsFn", "fisher_diagonal", "fisher_plan", "num_parameters"]


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
      A ``mask`` (or ``label_mask``) that counts nothing is refused; traced under ``jit``, it
      gives NaN importance (a mean over no row), never a silent 0.
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
  checks.check_settings(kind, method, reduction, batch_size)
  setup = checks.setup_call(logits_fn, params, inputs, leaf_mask, "logits_fn")
  traced, n = setup.traced, setup.n
  labels, label_mask, weights = checks.checked_targets(setup, labels, label_mask, mask, kind, key)
  checks.check_something_counted(weights, label_mask, n)
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
                             batch_size=int(batch_size), has_mask=weights is not None,
                             normalize=bool(normalize_by_num_params), host_loop=host_loop)
  program = prog.PROGRAMS.get(
      None if traced.key is None else (traced.key, settings, host_loop), build)
  values, flags, finite = program(list(consts), traced.leaves,
                                  prog.Rows(setup.inputs, labels, label_mask, weights), key)
  checks.raise_flags(flags, finite, _active_paths(traced, setup.active), runtime_checks,
                     "logits_fn")
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
  checks.check_settings("empirical", method, "sum")
  setup = checks.setup_call(logits_fn, params, inputs, leaf_mask, "logits_fn")
  flat = per_example.inline_calls(setup.traced.closed)
  _, plan = per_example.make_sq_grad_sum(
      flat, len(setup.traced.closed.consts), len(setup.traced.leaves), lambda out, t: out,
      method=method, active=setup.active)
  return tuple(LeafPlan(path, tuple(shape), m, why)
               for path, shape, (m, why) in zip(setup.traced.paths, setup.traced.shapes, plan))


def num_parameters(params: PyTree) -> int:
  """Total number of scalars in ``params``."""
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(params)))
