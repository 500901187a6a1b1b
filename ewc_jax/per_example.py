r"""Exact per-example squared gradients :math:`S = \sum_b w_b (\partial\ell_b/\partial\theta)^2`.

``jax.vmap(jax.grad(...))`` materialises B copies of every weight and, for a convolution, computes
them with a grouped convolution that is slow on most backends. For a parameter W that enters the
model through one linear map, the per-example gradient is a contraction of two tensors the
batched backward pass already has: the map's input ``a_b`` and the gradient of its output
:math:`\delta_b = \partial\ell_b/\partial z_b`:

* ``"dense"``: ``z = a @ W`` with one row per example: :math:`\partial_W\ell_b = a_b^\top\delta_b`
  (an outer product), so :math:`S = (w \circ a \circ a)^\top (\delta\circ\delta)`: one matmul.
* ``"rows"``: ``z = a @ W`` with R rows per example (tokens, a time axis):
  :math:`\partial_W\ell_b = \sum_r a_{br}^\top\delta_{br}`: one batched matmul ``[B, D, R] x
  [B, R, O]``, squared and summed over b.
* ``"conv"``: ``z = conv(a, W)`` (any strides, padding, input/kernel dilation, layout):
  :math:`\partial_W\ell_b = U(a_b)^\top\delta_b` with :math:`U` the unfold (im2col) of the
  example's input into ``[P, K]`` patches (P output positions, K = kernel taps x input channels):
  one batched matmul per layer, as BackPACK does it (Dangel, Kunstner & Hennig, 2020).

The sites are found model-agnostically: :func:`analyse` reads the jaxpr of ``logits_fn`` traced for
a *single* example, follows each parameter leaf through dtype casts (mixed precision: bf16 compute,
f32 parameters) to its one use, and checks the conditions above. :func:`make_sq_grad_sum`
re-evaluates that jaxpr under ``vmap`` with a zero "tap" added to each site's output (the tap's
gradient is δ) and records the site's input (a). Every other leaf (biases, norm scales, shared
weights, grouped convolutions, ...) gets exact ``vmap(grad)`` gradients in the same backward
pass; ``fisher_plan`` says which path each leaf takes and why. Memory: the batched matmuls hold
``[B, K, O]`` per-example gradients of one layer at a time (what ``vmap(grad)`` holds for every
leaf at once); lower ``batch_size`` for very wide layers.

Example::

  >>> import jax, jax.numpy as jnp
  >>> fn = lambda leaves, x: jnp.tanh(x @ leaves[0]) @ leaves[1] + leaves[2]  # one example
  >>> ls = [jnp.ones((4, 3)), jnp.ones((3, 2)), jnp.zeros(2)]
  >>> [m for m, _ in analyse_fn(fn, ls, jnp.ones(4))]
  ['dense', 'dense', 'vmap']

References:
  Dangel, Kunstner & Hennig, 2020. BackPACK: Packing more into backprop. ICLR.
  Goodfellow, 2015. Efficient per-example gradient computations. arXiv:1510.01799.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

SingleFn = Callable[[Sequence[jax.Array], Any], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]

PATHS = ("dense", "rows", "conv", "vmap")
_CASTS = ("convert_element_type",)
_HIGHEST = lax.Precision.HIGHEST


class Site(NamedTuple):
  """One fast-path use of a parameter leaf: equation ``eqn`` of the jaxpr, rule ``rule``."""
  eqn: int
  leaf: int
  rule: str


def _is_var(v) -> bool:
  return not isinstance(v, jex_core.Literal)


def analyse(jaxpr, num_leaves: int) -> tuple[dict[int, Site], list[tuple[str, str]]]:
  """Finds the fast-path sites of a single-example jaxpr whose first invars are the leaves.

  Returns ``(sites by eqn index, [(path, reason)] per leaf)``; ``path`` is one of :data:`PATHS`.
  """
  uses: dict[Any, list[int]] = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if _is_var(v):
        uses.setdefault(v, []).append(i)
  outputs = {v for v in jaxpr.outvars if _is_var(v)}
  sites: dict[int, Site] = {}
  plan: list[tuple[str, str]] = []
  for leaf, var in enumerate(jaxpr.invars[:num_leaves]):
    v, cast = var, False
    while (v not in outputs and len(uses.get(v, ())) == 1
           and jaxpr.eqns[uses[v][0]].primitive.name in _CASTS):
      v, cast = jaxpr.eqns[uses[v][0]].outvars[0], True
    n_uses = len(uses.get(v, ())) + (v in outputs)
    if n_uses == 0:
      plan.append(("vmap", "unused by logits_fn (zero gradient)"))
      continue
    if n_uses > 1:
      plan.append(("vmap", f"used by {n_uses} operations (a shared or reused weight)"))
      continue
    if v in outputs:
      plan.append(("vmap", "returned as an output"))
      continue
    i = uses[v][0]
    rule, reason = _site_rule(jaxpr.eqns[i], v)
    if rule is None:
      plan.append(("vmap", reason))
      continue
    sites[i] = Site(i, leaf, rule)
    plan.append((rule, reason + (" (after a dtype cast)" if cast else "")))
  return sites, plan


def _site_rule(eqn, v) -> tuple[str | None, str]:
  """``(rule, why)`` for the one equation that uses leaf value ``v``; rule None: no fast path."""
  name = eqn.primitive.name
  size = 1
  for d in v.aval.shape:
    size *= d
  cheap = (f"vmap(grad): used by {name}, not directly as a Dense/conv kernel ({size} values "
           f"per example: cheap for biases and scales)")
  if name == "dot_general":
    lhs, rhs = eqn.invars
    if rhs is not v or lhs is v:
      return None, "vmap(grad): the left operand of dot_general (a kernel must be the right one)"
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if len(v.aval.shape) != 2:
      return None, f"vmap(grad): a rank-{len(v.aval.shape)} dot_general operand (kernels are rank 2)"
    if tuple(lb) or tuple(rb):
      return None, "vmap(grad): dot_general with batch dimensions"
    if tuple(rc) != (0,):
      return None, "vmap(grad): contracted on its axis 1 (a kernel stored [out, in])"
    lshape = lhs.aval.shape
    if tuple(lc) != (len(lshape) - 1,):
      return None, "vmap(grad): the input is not contracted on its last axis"
    rows = 1
    for d in lshape[:-1]:
      rows *= d
    if rows == 1:
      return "dense", "dot_general kernel, one row per example: one matmul"
    return "rows", f"dot_general kernel, {rows} rows per example: one batched matmul"
  if name == "conv_general_dilated":
    lhs, rhs = eqn.invars
    if rhs is not v or lhs is v:
      return None, "vmap(grad): the input (not the kernel) of a convolution"
    p = eqn.params
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
      return None, (f"vmap(grad): grouped convolution (feature_group_count="
                    f"{p['feature_group_count']}, batch_group_count={p['batch_group_count']})")
    if lhs.aval.shape[p["dimension_numbers"].lhs_spec[0]] != 1:
      return None, "vmap(grad): a convolution over several images per example"
    return "conv", "convolution kernel: unfold + one batched matmul"
  return None, cheap


def analyse_fn(single: SingleFn, leaves: Sequence[Any], example: Any):
  """:func:`analyse` of ``single(leaves, example)`` (traced abstractly): ``[(path, reason)]``."""
  jaxpr, _ = _trace(single, leaves, example)
  return analyse(jaxpr.jaxpr, len(leaves))[1]


def _trace(single, leaves, example):
  abstract = [jax.ShapeDtypeStruct(jnp.shape(l), jnp.result_type(l)) for l in leaves]
  ex = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), example)
  closed = jax.make_jaxpr(single)(abstract, ex)
  return closed, abstract


def vmap_plan(num_leaves: int, why: str) -> list[tuple[str, str]]:
  return [("vmap", why)] * num_leaves


def make_vmap_sq_grad_sum(single: SingleFn, loss: LossFn):
  """``f(leaves, xb, yb, wb) -> [S per leaf]`` with ``vmap(grad)`` for every leaf."""
  per_example = jax.vmap(jax.grad(lambda ls, x, y: loss(single(ls, x), y)), in_axes=(None, 0, 0))

  def sq_grad_sum(leaves, xb, yb, wb):
    g = per_example(list(leaves), xb, yb)
    return [jnp.tensordot(wb, jnp.square(x.astype(jnp.float32)), axes=1) for x in g]
  return sq_grad_sum


def make_sq_grad_sum(single: SingleFn, loss: LossFn, leaves: Sequence[Any], example: Any):
  """``(f(leaves, xb, yb, wb) -> [S per leaf], plan)`` using the fast paths where they apply.

  ``plan`` is ``[(path, reason)]`` per leaf. When no leaf has a fast path, ``f`` is the plain
  ``vmap(grad)`` (same result).
  """
  closed, _ = _trace(single, leaves, example)
  jaxpr = closed.jaxpr
  if len(jaxpr.outvars) != 1:
    return make_vmap_sq_grad_sum(single, loss), vmap_plan(len(leaves), "several outputs")
  sites, plan = analyse(jaxpr, len(leaves))
  if not sites:
    return make_vmap_sq_grad_sum(single, loss), plan
  num = len(leaves)
  covered = {s.leaf for s in sites.values()}
  rest = [i for i in range(num) if i not in covered]
  out_avals = {i: jaxpr.eqns[i].outvars[0].aval for i in sites}

  def per_example_loss(rest_vals, taps, all_leaves, x, y):
    full = list(all_leaves)
    for j, i in enumerate(rest):
      full[i] = rest_vals[j]
    (logits,), acts = _eval_with_taps(jaxpr, closed.consts, full + jax.tree.leaves(x), sites,
                                      taps)
    return loss(logits, y), acts

  grads_fn = jax.vmap(jax.grad(per_example_loss, argnums=(0, 1), has_aux=True),
                      in_axes=(None, 0, None, 0, 0))

  def sq_grad_sum(leaves_, xb, yb, wb):
    leaves_ = list(leaves_)
    b = wb.shape[0]
    taps = {i: jnp.zeros((b,) + aval.shape, aval.dtype) for i, aval in out_avals.items()}
    rest_vals = [lax.stop_gradient(leaves_[i]) for i in rest]
    frozen = [lax.stop_gradient(l) for l in leaves_]
    (g_rest, g_taps), acts = grads_fn(rest_vals, taps, frozen, xb, yb)
    out: list[Any] = [None] * num
    for i, site in sites.items():
      eqn = jaxpr.eqns[i]
      out[site.leaf] = _RULES[site.rule](eqn, acts[i], g_taps[i], wb)
    for j, i in enumerate(rest):
      out[i] = jnp.tensordot(wb, jnp.square(g_rest[j].astype(jnp.float32)), axes=1)
    return out
  return sq_grad_sum, plan


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


def _dense(eqn, a, d, wb):
  """S = (w a²)ᵀ δ² for ``z = a @ W`` with one row per example."""
  del eqn
  b = wb.shape[0]
  a = a.reshape(b, -1).astype(jnp.float32)
  d = d.reshape(b, -1).astype(jnp.float32)
  return jnp.dot((a * a * wb[:, None]).T, d * d, precision=_HIGHEST)


def _bmm_square_sum(a, d, wb):
  """Σ_b w_b (a_bᵀ δ_b)² for a ``[B, P, K]``, δ ``[B, P, O]``: a float32 ``[K, O]``."""
  g = jnp.einsum("bpk,bpo->bko", a.astype(jnp.float32), d.astype(jnp.float32),
                 precision=_HIGHEST)
  return jnp.einsum("b,bko->ko", wb, g * g, precision=_HIGHEST)


def _rows(eqn, a, d, wb):
  """Per-example gradient Σ_r a_rᵀ δ_r for ``z = a @ W`` with R rows per example."""
  del eqn
  b = wb.shape[0]
  return _bmm_square_sum(a.reshape(b, -1, a.shape[-1]), d.reshape(b, -1, d.shape[-1]), wb)


def _conv(eqn, a, d, wb):
  """Per-example kernel gradient U(a_b)ᵀ δ_b of a convolution, put back in the kernel's layout."""
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  n_sp = len(lhs_spec) - 2
  rhs_shape = eqn.invars[1].aval.shape
  filt = [rhs_shape[k] for k in rhs_spec[2:]]
  # [B, *single] -> [B, *spatial, C] (the single example's batch axis has size 1).
  def channels_last(x, spec):
    x = jnp.transpose(x, (0,) + tuple(1 + k for k in (spec[0], *spec[2:], spec[1])))
    return x.reshape((x.shape[0],) + x.shape[2:])
  a = channels_last(a, lhs_spec).astype(jnp.float32)
  d = channels_last(d, out_spec)
  b, c, out_sp = a.shape[0], a.shape[-1], d.shape[1:-1]
  zero = jnp.zeros((), a.dtype)
  config = [(0, 0, 0)] + [(lo, hi, dil - 1) for (lo, hi), dil in
                          zip(p["padding"], p["lhs_dilation"])] + [(0, 0, 0)]
  a = lax.pad(a, zero, config)
  patches = []
  for offset in itertools.product(*(range(f) for f in filt)):
    start = [o * r for o, r in zip(offset, p["rhs_dilation"])]
    limit = [s + (n - 1) * st + 1 for s, n, st in zip(start, out_sp, p["window_strides"])]
    patches.append(lax.slice(a, (0, *start, 0), (b, *limit, c),
                             (1, *p["window_strides"], 1)))
  u = jnp.stack(patches, axis=-2)                       # [B, *out_sp, F, C]
  u = u.reshape(b, -1, len(patches) * c)                # K = (filter offset, channel)
  s = _bmm_square_sum(u, d.reshape(b, -1, d.shape[-1]), wb)   # [F*C, O]
  s = s.reshape(tuple(filt) + (c, d.shape[-1]))         # [*filt, I, O]
  perm = [0] * (n_sp + 2)
  perm[rhs_spec[0]] = n_sp + 1
  perm[rhs_spec[1]] = n_sp
  for j, k in enumerate(rhs_spec[2:]):
    perm[k] = j
  return jnp.transpose(s, perm)


_RULES = {"dense": _dense, "rows": _rows, "conv": _conv}
