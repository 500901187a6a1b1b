r"""Exact per-example squared gradients :math:`S = \sum_b w_b (\partial\ell_b/\partial\theta)^2`.

``jax.vmap(jax.grad(...))`` materialises B copies of every weight and, for a convolution or an
embedding, computes them with a grouped convolution or a B-fold scatter that are slow on most
backends. For a parameter W that enters the model through one map linear in W, the per-example
gradient is a contraction of two tensors the batched backward pass already has: the map's other
operand ``a_b`` and the gradient of its output :math:`\delta_b = \partial\ell_b/\partial z_b`.
The rules (:data:`PATHS`; ``fisher_plan`` names the one each leaf takes):

* ``"dense"``: ``z = dot_general(a, W)`` with one row per example, any contracting, free and batch
  dimensions on either side (Dense, DenseGeneral/LinearGeneral, einsum projections):
  :math:`\partial_W\ell_b = a_b \otimes \delta_b`, so :math:`S = (w\,a^2)^\top \delta^2`: one
  matmul, no per-example gradient is ever formed.
* ``"rows"``: the same with R rows per example (tokens, patches, a time axis):
  :math:`\partial_W\ell_b = \sum_r a_{br} \otimes \delta_{br}`: one batched matmul.
* ``"conv"``: ``z = conv(a, W)`` (any strides, padding, dilation, layout, feature groups:
  depthwise and grouped convolutions, several images per example): :math:`\partial_W\ell_b =
  U(a_b)^\top\delta_b` with U the unfold (im2col) of the example's input (BackPACK's method,
  Dangel, Kunstner & Hennig, 2020), computed one filter offset at a time: a batched matmul of a
  shifted slice of the input with δ, so at most 1/F of the per-example gradients are held.
* ``"embed"``: a table lookup ``z = W[i]`` (``jnp.take``, ``nnx.Embed``, ``nn.Embed``), a token
  repeated within an example included: the rows of δ that share a token are summed per example
  (a sort and a segment sum), squared and scattered into the table: O(B·T·D), never ``[B, V, D]``.
* ``"elementwise"``: the leaf reaches the model only through shape operations and elementwise
  arithmetic (biases, LayerNorm/RMSNorm/GroupNorm/BatchNorm scale and bias, position embeddings
  added to the input): its exact per-example gradient costs one activation-sized reduction.
* ``"tied"``: one leaf used by several linear maps (tied input/output embeddings, a weight
  applied twice): exact per-example gradients summed over the uses, then squared; memory one
  ``[B, *leaf]`` at a time.
* ``"unused"``: no path from the leaf to the output: importance exactly 0.
* ``"vmap"``: anything else (a leaf inside a ``scan`` or a custom-derivative function, used
  non-linearly, ...): exact ``vmap(grad)`` for that leaf, the reason given.

The sites are found model-agnostically: :func:`analyse` reads the jaxpr of the model traced for a
*single* example (nested ``jit`` calls inlined by :func:`inline_calls`), follows each parameter
leaf through dtype casts (mixed precision: bf16 compute, f32 parameters), reshapes and transposes
to its uses, and checks the conditions above. :func:`make_sq_grad_sum` re-evaluates the jaxpr
under ``vmap`` with a zero "tap" added to each site's output (the tap's gradient is δ) and
records the site's other operand (a). Memory: no rule holds more than one leaf's ``[B, *leaf]``
per-example gradients (``rows``, ``conv``, ``tied``); lower ``batch_size`` for very wide layers.

Example::

  >>> import jax, jax.numpy as jnp
  >>> fn = lambda leaves, x: jnp.tanh(x @ leaves[0]) @ leaves[1] + leaves[2]  # one example
  >>> ls = [jnp.ones((4, 3)), jnp.ones((3, 2)), jnp.zeros(2)]
  >>> [m for m, _ in analyse_fn(fn, ls, jnp.ones(4))]
  ['dense', 'dense', 'elementwise']

References:
  Dangel, Kunstner & Hennig, 2020. BackPACK: Packing more into backprop. ICLR.
  Goodfellow, 2015. Efficient per-example gradient computations. arXiv:1510.01799.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

SingleFn = Callable[[Sequence[jax.Array], Any], jax.Array]
LossFn = Callable[[jax.Array, Any], jax.Array]

PATHS = ("dense", "rows", "conv", "embed", "elementwise", "tied", "unused", "vmap")
FAST_PATHS = ("dense", "rows", "conv", "embed", "elementwise", "tied", "unused")
_HIGHEST = lax.Precision.HIGHEST
# The conv rule batches filter offsets until a matmul contracts at least this many input channels.
_CONV_MIN_K = 32

# Shape-only maps that keep every entry (the squared gradient maps back entry by entry).
_ENTRYWISE = ("convert_element_type", "reshape", "transpose", "squeeze", "expand_dims", "copy",
              "copy_p", "reduce_precision")
# Shape maps that are linear but may sum or drop entries (followed for the elementwise rule).
_STRUCTURAL = _ENTRYWISE + ("broadcast_in_dim", "slice", "dynamic_slice", "rev", "pad",
                            "concatenate", "stop_gradient")
_ELEMENTWISE = ("add", "add_any", "sub", "mul", "div", "neg", "max", "min", "integer_pow",
                "square", "sqrt", "rsqrt", "exp", "exp2", "log", "log1p", "tanh", "logistic",
                "abs", "sign", "pow", "clamp", "erf", "sin", "cos", "reduce_sum", "reduce_max",
                "reduce_min", "cumsum", "expm1", "atan2", "erf_inv", "cbrt", "select_n")
_LINEAR_SITES = ("dot_general", "gather")
# Call primitives whose body is inlined before the analysis (no semantics of their own).
_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "remat2")


class Site(NamedTuple):
  """One fast-path use of a parameter leaf: equation ``eqn`` of the jaxpr, rule ``rule``.

  ``operand``: the position of the leaf's value among the eqn's inputs; ``chain``: the
  entrywise shape maps from the leaf to that value, as ``(primitive name, params, in shape)``.
  """
  eqn: int
  leaf: int
  rule: str
  operand: int
  chain: tuple


class Analysis(NamedTuple):
  """:func:`analyse`'s result: ``sites`` by eqn index, ``plan`` as ``(path, reason)`` per leaf."""
  sites: dict
  plan: list


def _is_var(v) -> bool:
  return not isinstance(v, jex_core.Literal)


def inline_calls(closed):
  """``closed`` (a ClosedJaxpr) with every nested ``jit``/``closed_call``/``remat`` inlined.

  Returns a ClosedJaxpr whose invars are ``closed``'s consts followed by its invars (the consts
  become arguments), so that the result depends only on the structure of the computation.
  """
  def run(jaxpr, consts, *args):
    env, read = _environment(jaxpr, consts, args)
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      sub = eqn.params.get("jaxpr") if eqn.primitive.name in _CALLS else None
      if sub is not None:
        inner, inner_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
        outs = run(inner, inner_consts, *invals)
      else:
        outs = _bind(eqn, invals)
        outs = outs if eqn.primitive.multiple_results else [outs]
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  const_avals = [jax.ShapeDtypeStruct(np.shape(c), jnp.result_type(c)) for c in closed.consts]
  in_avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
  return jax.make_jaxpr(lambda c, a: run(closed.jaxpr, c, *a))(const_avals, in_avals)


def _environment(jaxpr, consts, args):
  """``(env, read)`` of an evaluation of ``jaxpr``: its constvars and invars bound."""
  env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]
  return env, read


def _bind(eqn, invals):
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = []
  if isinstance(bind_params, tuple):  # (subfuns, params)
    subfuns, bind_params = bind_params
  return eqn.primitive.bind(*subfuns, *invals, **bind_params)


def analyse(jaxpr, leaf_vars: Sequence[Any]) -> Analysis:
  """Finds the fast-path sites of a single-example jaxpr for the leaves bound to ``leaf_vars``.

  Returns :class:`Analysis`; each plan entry's path is one of :data:`PATHS`.
  """
  uses: dict[Any, list[int]] = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if _is_var(v):
        uses.setdefault(v, []).append(i)
  outputs = {v for v in jaxpr.outvars if _is_var(v)}
  sites: dict[int, Site] = {}
  plan: list[tuple[str, str]] = []
  for leaf, var in enumerate(leaf_vars):
    v, chain = var, []
    while (v not in outputs and len(uses.get(v, ())) == 1
           and jaxpr.eqns[uses[v][0]].primitive.name in _ENTRYWISE):
      eqn = jaxpr.eqns[uses[v][0]]
      chain.append((eqn.primitive.name, dict(eqn.params), tuple(v.aval.shape)))
      v = eqn.outvars[0]
    users = uses.get(v, ())
    if not users and v not in outputs:
      plan.append(("unused", "no path to the output: importance 0"))
      continue
    if len(users) == 1 and v not in outputs:
      eqn = jaxpr.eqns[users[0]]
      rule, reason = _site_rule(eqn, v)
      if rule is not None:
        operand = list(eqn.invars).index(v)
        sites[users[0]] = Site(users[0], leaf, rule, operand, tuple(chain))
        casts = any(c[0] == "convert_element_type" for c in chain)
        plan.append((rule, reason + (" (after a dtype cast)" if casts else "")))
        continue
    plan.append(_cotangent_plan(jaxpr, uses, outputs, var))
  return Analysis(sites, plan)


def _cotangent_plan(jaxpr, uses, outputs, var) -> tuple[str, str]:
  """How a leaf without a single-site rule is classified (its per-example cotangent is used)."""
  terminals: list[str] = []
  stack, seen = [var], set()
  while stack:
    v = stack.pop()
    if v in seen:
      continue
    seen.add(v)
    if v in outputs:
      return "vmap", "vmap(grad): returned as an output"
    for i in uses.get(v, ()):
      eqn = jaxpr.eqns[i]
      name = eqn.primitive.name
      if name in _STRUCTURAL:
        stack.extend(o for o in eqn.outvars if _is_var(o))
      else:
        terminals.append(name)
  if not terminals:
    return "unused", "no path to the output: importance 0"
  kinds = sorted(set(terminals))
  if all(t in _ELEMENTWISE for t in terminals):
    return "elementwise", (f"elementwise use ({', '.join(kinds)}): per-example gradient at the "
                           f"cost of one activation")
  if len(terminals) > 1 and all(t in _ELEMENTWISE + _LINEAR_SITES for t in terminals):
    return "tied", (f"used by {len(terminals)} operations ({', '.join(kinds)}): a tied or reused "
                    f"weight, exact per-example gradients summed over its uses")
  heavy = [t for t in kinds if t not in _ELEMENTWISE]
  return "vmap", (f"vmap(grad): used by {', '.join(heavy)}, which has no per-example rule "
                  f"(exact, one per-example gradient of this leaf per example)")


def _site_rule(eqn, v) -> tuple[str | None, str]:
  """``(rule, why)`` for the one equation that uses leaf value ``v``; rule None: no rule."""
  name = eqn.primitive.name
  if list(eqn.invars).count(v) != 1:
    return None, ""
  if name == "dot_general":
    side = list(eqn.invars).index(v)
    other = eqn.invars[1 - side]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    oc, ob = (rc, rb) if side == 0 else (lc, lb)
    rows = int(np.prod([d for k, d in enumerate(other.aval.shape) if k not in oc and k not in ob],
                       dtype=np.int64))
    if rows == 1:
      return "dense", "dot_general, one row per example: one matmul"
    return "rows", f"dot_general, {rows} rows per example: one batched matmul"
  if name == "conv_general_dilated":
    if list(eqn.invars).index(v) != 1:
      return None, ""
    p = eqn.params
    if p["batch_group_count"] != 1:
      return None, ""
    groups = p["feature_group_count"]
    what = "convolution kernel" if groups == 1 else f"grouped convolution ({groups} groups)"
    return "conv", f"{what}: unfold + one batched matmul"
  if name == "gather" and list(eqn.invars).index(v) == 0 and _is_lookup(eqn):
    return "embed", "table lookup (gather): per-example row sums, no [B, V, D] gradient"
  return None, ""


def _is_lookup(eqn) -> bool:
  """``gather`` that takes whole rows of its operand by one index: ``W[i]`` / ``jnp.take``."""
  p = eqn.params
  dn = p["dimension_numbers"]
  op_shape = eqn.invars[0].aval.shape
  idx_shape = eqn.invars[1].aval.shape
  out_rank = len(eqn.outvars[0].aval.shape)
  if tuple(getattr(dn, "operand_batching_dims", ())) or len(op_shape) < 1:
    return False
  if tuple(dn.collapsed_slice_dims) != (0,) or tuple(dn.start_index_map) != (0,):
    return False
  if tuple(p["slice_sizes"]) != (1,) + tuple(op_shape[1:]):
    return False
  if not idx_shape or idx_shape[-1] != 1:
    return False
  n_off = len(op_shape) - 1
  return tuple(dn.offset_dims) == tuple(range(out_rank - n_off, out_rank))


def analyse_fn(single: SingleFn, leaves: Sequence[Any], example: Any):
  """:func:`analyse` of ``single(leaves, example)`` (traced abstractly): ``[(path, reason)]``."""
  flat, consts = trace_flat(single, leaves, example)
  return analyse(flat.jaxpr, flat.jaxpr.invars[len(consts):len(consts) + len(leaves)]).plan


def trace_flat(single, leaves, example):
  """The inlined jaxpr of ``single(leaves, example)``: ``(ClosedJaxpr, consts)``, whose invars
  are the original consts, then the leaves, then the example's leaves."""
  abstract = [jax.ShapeDtypeStruct(jnp.shape(l), jnp.result_type(l)) for l in leaves]
  ex = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), example)
  closed = jax.make_jaxpr(single)(abstract, ex)
  flat = inline_calls(closed)
  return flat, list(closed.consts)


def make_sq_grad_sum(closed, num_args: int, num_leaves: int, loss: LossFn, *,
                     method: str = "auto", active: Sequence[bool] | None = None):
  """``(f(args, leaves, xb, tb, wb) -> ([S per leaf], outs), plan)`` for a flat jaxpr.

  ``closed``: a ClosedJaxpr from :func:`trace_flat` whose invars are ``num_args`` hoisted consts
  (``args``), then the ``num_leaves`` leaves, then the example's leaves, with one output ``out``;
  the per-example loss is ``loss(out, t)``. ``f`` takes ``xb``/``tb`` with a leading batch axis
  and ``wb`` ``[B]`` row weights, and also returns the per-example outputs ``outs`` (no
  gradient). Leaves with ``active[i]`` False get None (not computed, plan ``"masked"``).
  ``method="vmap"`` computes every leaf with ``vmap(grad)``.
  """
  jaxpr = closed.jaxpr
  leaf_vars = jaxpr.invars[num_args:num_args + num_leaves]
  active = [True] * num_leaves if active is None else list(active)
  if method == "vmap" or len(jaxpr.outvars) != 1:
    why = "vmap(grad): method='vmap'" if method == "vmap" else "vmap(grad): several outputs"
    sites, plan = {}, [("vmap", why)] * num_leaves
  else:
    sites, plan = analyse(jaxpr, leaf_vars)
  sites = {i: s for i, s in sites.items() if active[s.leaf]}
  plan = [p if on else ("masked", "excluded by leaf_mask: importance 0")
          for p, on in zip(plan, active)]
  covered = {s.leaf for s in sites.values()}
  rest = [i for i in range(num_leaves)
          if active[i] and i not in covered and plan[i][0] != "unused"]
  unused = [i for i in range(num_leaves) if active[i] and plan[i][0] == "unused"]
  out_avals = {i: jaxpr.eqns[i].outvars[0].aval for i in sites}

  def per_example_loss(rest_vals, taps, args, all_leaves, x, t):
    full = list(all_leaves)
    for j, i in enumerate(rest):
      full[i] = rest_vals[j]
    (out,), recorded = _eval_with_taps(jaxpr, closed.consts,
                                       list(args) + full + jax.tree.leaves(x), sites, taps)
    return loss(out, t), (recorded, out)

  grads_fn = jax.vmap(jax.grad(per_example_loss, argnums=(0, 1), has_aux=True),
                      in_axes=(None, 0, None, None, 0, 0))

  def sq_grad_sum(args, leaves_, xb, tb, wb):
    leaves_ = list(leaves_)
    b = wb.shape[0]
    taps = {i: jnp.zeros((b,) + aval.shape, aval.dtype) for i, aval in out_avals.items()}
    rest_vals = [lax.stop_gradient(leaves_[i]) for i in rest]
    frozen = [lax.stop_gradient(l) for l in leaves_]
    args = [lax.stop_gradient(a) for a in args]
    (g_rest, g_taps), (recorded, outs) = grads_fn(rest_vals, taps, args, frozen, xb, tb)
    out: list[Any] = [None] * num_leaves
    for i, site in sites.items():
      s = _RULES[site.rule](jaxpr.eqns[i], site, recorded[i], g_taps[i], wb)
      out[site.leaf] = _undo_chain(s, site.chain)
    for j, i in enumerate(rest):
      out[i] = jnp.tensordot(wb, jnp.square(g_rest[j].astype(jnp.float32)), axes=1)
    for i in unused:
      out[i] = jnp.zeros(leaf_vars[i].aval.shape, jnp.float32)
    return out, lax.stop_gradient(outs)
  return sq_grad_sum, plan


def _eval_with_taps(jaxpr, consts, args, sites, taps):
  """Evaluates ``jaxpr``; adds ``taps[i]`` to the output of each site eqn and records the site's
  other operand."""
  env, read = _environment(jaxpr, consts, args)
  recorded = {}
  for i, eqn in enumerate(jaxpr.eqns):
    invals = [read(v) for v in eqn.invars]
    out = _bind(eqn, invals)
    if i in sites:
      site = sites[i]
      recorded[i] = invals[1] if site.rule == "embed" else invals[1 - site.operand]
      out = out + taps[i]
    outs = out if eqn.primitive.multiple_results else [out]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars], recorded


def _undo_chain(s, chain):
  """Maps a squared-gradient sum from the site's operand layout back to the leaf's layout."""
  for name, params, in_shape in reversed(chain):
    if name == "transpose":
      s = jnp.transpose(s, np.argsort(params["permutation"]))
    s = s.reshape(in_shape)
  return s


def _dot(eqn, site, a, d, wb):
  """Σ_b w_b (∂ℓ_b/∂W)² for ``z = dot_general(·, W)``, W on either side, in W's layout."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lc, rc, lb, rb = map(tuple, (lc, rc, lb, rb))
  w_shape = eqn.invars[site.operand].aval.shape
  o_shape = eqn.invars[1 - site.operand].aval.shape
  if site.operand == 1:
    wc, wb_, oc, ob = rc, rb, lc, lb
  else:
    wc, wb_, oc, ob = lc, lb, rc, rb
  wf = tuple(k for k in range(len(w_shape)) if k not in wc and k not in wb_)
  of = tuple(k for k in range(len(o_shape)) if k not in oc and k not in ob)
  nb = len(lb)
  # Output dims: batch, lhs free, rhs free; the other operand's free dims are the rows.
  if site.operand == 1:
    out_rows = tuple(range(nb, nb + len(of)))
    out_wf = tuple(range(nb + len(of), nb + len(of) + len(wf)))
  else:
    out_wf = tuple(range(nb, nb + len(wf)))
    out_rows = tuple(range(nb + len(wf), nb + len(wf) + len(of)))
  size = lambda dims, shape: int(np.prod([shape[k] for k in dims], dtype=np.int64))  # noqa: E731
  B = wb.shape[0]
  n_b, n_c, n_r = size(ob, o_shape), size(oc, o_shape), size(of, o_shape)
  n_o = size(wf, w_shape)
  a = jnp.transpose(a, (0,) + tuple(1 + k for k in ob + oc + of)).reshape(B, n_b, n_c, n_r)
  d = jnp.transpose(d, (0,) + tuple(1 + k for k in tuple(range(nb)) + out_rows + out_wf))
  d = d.reshape(B, n_b, n_r, n_o)
  a, d = a.astype(jnp.float32), d.astype(jnp.float32)
  if n_b == 1 and n_r == 1:       # S = (w a²)ᵀ δ²: one matmul
    a, d = a.reshape(B, n_c), d.reshape(B, n_o)
    s = jnp.dot((a * a * wb[:, None]).T, d * d, precision=_HIGHEST)[None]
  elif n_b == 1:
    s = _bmm_square_sum(jnp.swapaxes(a[:, 0], 1, 2), d[:, 0], wb)[None]
  elif n_r == 1:
    s = jnp.einsum("bnc,bno->nco", a[..., 0] * a[..., 0] * wb[:, None, None], d[:, :, 0] ** 2,
                   precision=_HIGHEST)
  else:
    g = jnp.einsum("bncr,bnro->bnco", a, d, precision=_HIGHEST)
    s = jnp.einsum("b,bnco->nco", wb, g * g, precision=_HIGHEST)
  order = wb_ + wc + wf
  s = s.reshape(tuple(w_shape[k] for k in order))
  return jnp.transpose(s, np.argsort(order))


def _bmm_square_sum(a, d, wb):
  """Σ_b w_b (a_bᵀ δ_b)² for a ``[B, P, K]``, δ ``[B, P, O]``: a float32 ``[K, O]``."""
  g = jnp.einsum("bpk,bpo->bko", a.astype(jnp.float32), d.astype(jnp.float32),
                 precision=_HIGHEST)
  return jnp.einsum("b,bko->ko", wb, g * g, precision=_HIGHEST)


def _conv(eqn, site, a, d, wb):
  """Per-example kernel gradient U(a_b)ᵀ δ_b of a convolution (any feature groups), squared and
  summed, in the kernel's layout.

  A few filter offsets at a time: the gradient of the kernel's taps at offset f is
  Σ_p a_b[p + f]ᵀ δ_b[p], a ``[B, C, O]`` batched matmul of a shifted slice of the input with
  the output gradient, squared and summed over b at once. Offsets are taken one at a time when
  the input has at least ``_CONV_MIN_K`` channels per group, else ``ceil(_CONV_MIN_K / C)`` of
  them with their slices side by side (a partial unfold: a 1-channel input's per-offset matmul
  is a matrix-vector product, ~2.5x slower than one ``[B, F·C, O]`` matmul on CPU); at most
  that many input slices and per-offset kernel gradients are held at once.
  """
  del site
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  n_sp = len(lhs_spec) - 2
  rhs_shape = eqn.invars[1].aval.shape
  filt = [rhs_shape[k] for k in rhs_spec[2:]]
  groups = p["feature_group_count"]
  # [B, *single] -> [B * n, *spatial, C]: n images per example (usually 1), channels last.
  def channels_last(x, spec):
    x = jnp.transpose(x, (0,) + tuple(1 + k for k in (spec[0], *spec[2:], spec[1])))
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
  b = wb.shape[0]
  a = channels_last(a, lhs_spec).astype(jnp.float32)
  d = channels_last(d, out_spec).astype(jnp.float32)
  bn, c, out_sp, o = a.shape[0], a.shape[-1], d.shape[1:-1], d.shape[-1]
  cg, og = c // groups, o // groups
  zero = jnp.zeros((), a.dtype)
  config = [(0, 0, 0)] + [(lo, hi, dil - 1) for (lo, hi), dil in
                          zip(p["padding"], p["lhs_dilation"])] + [(0, 0, 0)]
  a = lax.pad(a, zero, config)
  d = jnp.transpose(d.reshape(b, -1, groups, og), (0, 2, 1, 3))   # [B, G, P, Og]
  offsets = list(itertools.product(*(range(f) for f in filt)))
  per = min(len(offsets), -(-_CONV_MIN_K // cg))                # offsets per matmul
  per_offset = []
  for first in range(0, len(offsets), per):
    chunk = offsets[first:first + per]
    slices = []
    for offset in chunk:
      start = [q * r for q, r in zip(offset, p["rhs_dilation"])]
      limit = [s + (n - 1) * st + 1 for s, n, st in zip(start, out_sp, p["window_strides"])]
      u = lax.slice(a, (0, *start, 0), (bn, *limit, c), (1, *p["window_strides"], 1))
      slices.append(jnp.transpose(u.reshape(b, -1, groups, cg), (0, 2, 1, 3)))  # [B, G, P, Cg]
    u = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)  # [B, G, P, k·Cg]
    g = jnp.einsum("bgpc,bgpo->bgco", u, d, precision=_HIGHEST)
    sq = jnp.einsum("b,bgco->gco", wb, g * g, precision=_HIGHEST)  # [G, k·Cg, Og]
    per_offset.append(jnp.transpose(sq.reshape(groups, len(chunk), cg, og), (1, 0, 2, 3)))
  s = jnp.concatenate(per_offset)                               # [F, G, Cg, Og]
  s = jnp.transpose(s, (0, 2, 1, 3)).reshape(tuple(filt) + (cg, o))  # [*filt, I, O]
  perm = [0] * (n_sp + 2)
  perm[rhs_spec[0]] = n_sp + 1
  perm[rhs_spec[1]] = n_sp
  for j, k in enumerate(rhs_spec[2:]):
    perm[k] = j
  return jnp.transpose(s, perm)


def _embed(eqn, site, idx, d, wb):
  """Σ_b w_b (Σ_{t: i_bt = v} δ_bt)² for each table row v of a lookup ``z = W[i]``."""
  del site
  table = eqn.invars[0].aval.shape
  v_rows, row = table[0], tuple(table[1:])
  b = wb.shape[0]
  idx = idx.reshape(b, -1).astype(jnp.int32)                    # [B, T] (index vector dim 1)
  t = idx.shape[1]
  d = d.reshape(b, t, -1).astype(jnp.float32)                   # [B, T, D]
  mode = str(eqn.params.get("mode", ""))
  if "CLIP" in mode or "PROMISE" in mode:
    idx = jnp.clip(idx, 0, v_rows - 1)
  valid = (idx >= 0) & (idx < v_rows)                           # FILL_OR_DROP drops the others
  key = jnp.where(valid, idx, v_rows)
  d = jnp.where(valid[..., None], d, 0.0)
  order = jnp.argsort(key, axis=1)
  sk = jnp.take_along_axis(key, order, axis=1)
  sd = jnp.take_along_axis(d, order[..., None], axis=1)
  new = jnp.concatenate([jnp.ones((b, 1), bool), sk[:, 1:] != sk[:, :-1]], axis=1)
  seg = jnp.cumsum(new, axis=1) - 1 + (jnp.arange(b) * t)[:, None]      # [B, T] in [0, B*T)
  sums = jax.ops.segment_sum(sd.reshape(b * t, -1), seg.reshape(-1), num_segments=b * t)
  tok = jnp.full((b * t,), v_rows, jnp.int32).at[seg.reshape(-1)].set(sk.reshape(-1))
  w = jnp.repeat(wb, t)
  s = jnp.zeros((v_rows + 1, sums.shape[-1]), jnp.float32).at[tok].add(w[:, None] * sums * sums)
  return s[:v_rows].reshape((v_rows,) + row)


_RULES = {"dense": _dot, "rows": _dot, "conv": _conv, "embed": _embed}
