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
to its uses, and checks the conditions above. :func:`make_sq_grad_sum` evaluates the jaxpr on
the batch with a "tap" (a ``custom_vjp`` identity) on each site's output that applies the site's
rule (in :mod:`ewc_jax.per_example_rules`) to (a, δ) when the backward pass reaches it: one
backward pass, one layer's δ and per-example gradients live at a time (the Fisher of ResNet-18
takes 0.8x a train step's compiled memory). No rule holds more than one leaf's ``[B, *leaf]``
per-example gradients (``rows``, ``tied``; ``conv`` one filter offset's); lower ``batch_size``
for very wide layers.

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

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from ewc_jax import per_example_rules
from ewc_jax.loop_conv import loop_conv

SingleFn = Callable[[Sequence[jax.Array], Any], jax.Array]
LossFn = Callable[[jax.Array, Any], jax.Array]

PATHS = ("dense", "rows", "conv", "embed", "elementwise", "tied", "unused", "vmap")
FAST_PATHS = ("dense", "rows", "conv", "embed", "elementwise", "tied", "unused")

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

  Otherwise one backward pass of the summed loss computes everything: the jaxpr is evaluated on
  the batch one equation at a time (each under ``vmap``; a convolution as one convolution of
  the batch's images by :func:`~ewc_jax.loop_conv.loop_conv`), and a "tap" (a ``custom_vjp``
  identity) on each site's output applies the site's rule to (a, δ) when the backward pass
  reaches it, so δ and the per-example gradients of one layer are freed before the next layer's
  are formed (peak memory close to a training step's). A leaf without a single-site rule
  (biases, normalisation scales, tied or unsupported uses) is broadcast to ``[B, *leaf]`` with
  a tap whose cotangent is its per-example gradient, squared and summed there.
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
  if method == "vmap" or len(jaxpr.outvars) != 1:
    fn = _vmap_sq_grad_sum(closed, num_leaves, loss, rest)
  else:
    fn = _tapped_sq_grad_sum(closed, num_args, num_leaves, loss, sites, rest)

  def sq_grad_sum(args, leaves_, xb, tb, wb):
    out, outs = fn([lax.stop_gradient(a) for a in args],
                   [lax.stop_gradient(l) for l in leaves_], xb, tb, wb)
    for i in unused:
      out[i] = jnp.zeros(leaf_vars[i].aval.shape, jnp.float32)
    return out, lax.stop_gradient(outs)
  return sq_grad_sum, plan


def _vmap_sq_grad_sum(closed, num_leaves: int, loss: LossFn, rest: list):
  """Σ_b w_b g_b² by ``vmap(grad)`` for the leaves ``rest``: the reference method."""
  def per_example_loss(rest_vals, args, all_leaves, x, t):
    full = list(all_leaves)
    for j, i in enumerate(rest):
      full[i] = rest_vals[j]
    (out,) = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *args, *full, *jax.tree.leaves(x))
    return loss(out, t), out

  grads_fn = jax.vmap(jax.grad(per_example_loss, has_aux=True), in_axes=(None, None, None, 0, 0))

  def fn(args, leaves_, xb, tb, wb):
    g, outs = grads_fn([leaves_[i] for i in rest], args, leaves_, xb, tb)
    out: list[Any] = [None] * num_leaves
    for j, i in enumerate(rest):
      out[i] = jnp.tensordot(wb, jnp.square(g[j].astype(jnp.float32)), axes=1)
    return out, outs
  return fn


def _site_tap(eqn, site):
  """Identity on a site's output ``z``; its backward pass returns δ and, as the cotangent of a
  zero accumulator, the rule's Σ_b w_b (∂ℓ_b/∂W)² from (a, δ)."""
  @jax.custom_vjp
  def tap(z, a, acc, wb):
    del a, acc, wb
    return z

  def fwd(z, a, acc, wb):
    del acc
    return z, (a, wb)

  def bwd(res, d):
    a, wb = res
    return d, None, per_example_rules.RULES[site.rule](eqn, site, a, d, wb), None
  tap.defvjp(fwd, bwd)
  return tap


@jax.custom_vjp
def _leaf_tap(zb, acc, wb):
  """Identity on a leaf broadcast to ``[B, *leaf]``; its cotangent (the per-example gradients)
  comes back squared and summed, Σ_b w_b g_b², as the accumulator's."""
  del acc, wb
  return zb


def _leaf_tap_fwd(zb, acc, wb):
  del acc
  return zb, wb


def _leaf_tap_bwd(wb, g):
  return None, jnp.tensordot(wb, jnp.square(g.astype(jnp.float32)), axes=1), None


_leaf_tap.defvjp(_leaf_tap_fwd, _leaf_tap_bwd)


def _tapped_sq_grad_sum(closed, num_args: int, num_leaves: int, loss: LossFn, sites: dict,
                        rest: list):
  """Σ_b w_b g_b² of every site and ``rest`` leaf from one backward pass (see
  :func:`make_sq_grad_sum`)."""
  jaxpr = closed.jaxpr
  taps = {i: _site_tap(jaxpr.eqns[i], s) for i, s in sites.items()}
  acc_avals = {i: jaxpr.eqns[i].invars[s.operand].aval for i, s in sites.items()}

  def total_loss(accs, args, leaves_, xb, tb, wb):
    site_accs, leaf_accs = accs
    b = wb.shape[0]
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars[:num_args], args))
    batched = set(jaxpr.invars[num_args + num_leaves:])
    env.update(zip(jaxpr.invars[num_args + num_leaves:], jax.tree.leaves(xb)))
    for j, v in enumerate(jaxpr.invars[num_args:num_args + num_leaves]):
      if j in leaf_accs:
        zb = jnp.broadcast_to(leaves_[j], (b,) + jnp.shape(leaves_[j]))
        env[v] = _leaf_tap(zb, leaf_accs[j], wb)
        batched.add(v)
      else:
        env[v] = leaves_[j]
    read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]  # noqa: E731
    for i, eqn in enumerate(jaxpr.eqns):
      invals = [read(v) for v in eqn.invars]
      axes = [0 if _is_var(v) and v in batched else None for v in eqn.invars]
      if i in sites and axes[1 - sites[i].operand] is None:  # a site whose data is shared
        k = 1 - sites[i].operand
        invals[k] = jnp.broadcast_to(invals[k], (b,) + jnp.shape(invals[k]))
        axes[k] = 0
      if _merges_batch(eqn, axes):
        out = _merged_conv(eqn, *invals)
        batched.update(eqn.outvars)
      elif any(a is not None for a in axes):
        out = jax.vmap(lambda *iv, eqn=eqn: _bind(eqn, iv), in_axes=axes)(*invals)
        batched.update(eqn.outvars)
      else:
        out = _bind(eqn, invals)
      if i in sites:
        other = invals[1] if sites[i].rule == "embed" else invals[1 - sites[i].operand]
        out = taps[i](out, other, site_accs[i], wb)
      outs = out if eqn.primitive.multiple_results else [out]
      env.update(zip(eqn.outvars, outs))
    (v,) = jaxpr.outvars
    out = read(v)
    if not (_is_var(v) and v in batched):
      out = jnp.broadcast_to(out, (b,) + jnp.shape(out))
    return jnp.sum(jax.vmap(loss)(out, tb)), out

  grad_fn = jax.grad(total_loss, has_aux=True)

  def fn(args, leaves_, xb, tb, wb):
    site_accs = {i: jnp.zeros(a.shape, jnp.float32) for i, a in acc_avals.items()}
    leaf_accs = {i: jnp.zeros(jnp.shape(leaves_[i]), jnp.float32) for i in rest}
    (g_sites, g_leaves), outs = grad_fn((site_accs, leaf_accs), args, leaves_, xb, tb, wb)
    out: list[Any] = [None] * num_leaves
    for i, site in sites.items():
      out[site.leaf] = _undo_chain(g_sites[i], site.chain)
    for i in rest:
      out[i] = g_leaves[i]
    return out, outs
  return fn


def _merges_batch(eqn, axes) -> bool:
  """Whether ``eqn`` is a convolution of batched images by one kernel whose image axis leads
  (the example's images and the batch merge into it, as ``vmap`` of the primitive does)."""
  if eqn.primitive.name != "conv_general_dilated" or list(axes) != [0, None]:
    return False
  dn = eqn.params["dimension_numbers"]
  return eqn.params["batch_group_count"] == 1 and dn.lhs_spec[0] == 0 and dn.out_spec[0] == 0


def _merged_conv(eqn, lhs, rhs):
  """The convolution of the ``[B, n, ...]`` images ``lhs`` as one convolution of ``B·n`` images
  by :func:`~ewc_jax.loop_conv.loop_conv` (the same values as the primitive's ``vmap``):
  the backward pass to the layer's input then stays fast inside the Fisher's loop over batches
  on the CPU (autodiff's input gradient there: 26.7 ms per batch of 128 for the cnn backbone's
  second convolution, against 6.9 ms)."""
  p = eqn.params
  y = loop_conv(lhs.reshape((-1,) + lhs.shape[2:]), rhs, p["window_strides"], p["padding"],
                lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
                dimension_numbers=p["dimension_numbers"],
                feature_group_count=p["feature_group_count"], precision=p["precision"],
                preferred_element_type=p["preferred_element_type"])
  return y.reshape(lhs.shape[:2] + y.shape[1:])


def _undo_chain(s, chain):
  """Maps a squared-gradient sum from the site's operand layout back to the leaf's layout."""
  for name, params, in_shape in reversed(chain):
    if name == "transpose":
      s = jnp.transpose(s, np.argsort(params["permutation"]))
    s = s.reshape(in_shape)
  return s
