"""The per-example rules of :mod:`ewc_jax.per_example`: each takes the site's equation, the
site, its other operand ``a`` and output gradient δ (both with a leading batch axis) and the row
weights ``wb``, and returns Σ_b w_b (∂ℓ_b/∂W)² in the parameter's layout at the site (float32).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


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

  One filter offset at a time: the gradient of the kernel's taps at offset f is
  Σ_p a_b[p + f]ᵀ δ_b[p], a ``[B, C, O]`` batched matmul of a shifted slice of the input with
  the output gradient, squared and summed over b at once, in a loop over the F offsets: no
  unfolded input and no more than 1/F of the per-example kernel gradients are ever held.
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
  strides = tuple(p["window_strides"])
  window = tuple((n - 1) * st + 1 for n, st in zip(out_sp, strides))
  starts = np.array([[q * r for q, r in zip(offset, p["rhs_dilation"])]
                     for offset in itertools.product(*(range(f) for f in filt))], np.int32)

  def offset_sum(start):
    zero_i = jnp.zeros((), jnp.result_type(*start))   # one index dtype (int64 under x64)
    u = lax.dynamic_slice(a, (zero_i, *start, zero_i), (bn, *window, c))
    u = lax.slice(u, (0,) * (n_sp + 2), u.shape, (1, *strides, 1))
    u = jnp.transpose(u.reshape(b, -1, groups, cg), (0, 2, 1, 3))  # [B, G, P, Cg]
    g = jnp.einsum("bgpc,bgpo->bgco", u, d, precision=_HIGHEST)
    return jnp.einsum("b,bgco->gco", wb, g * g, precision=_HIGHEST)

  if len(starts) == 1:
    s = offset_sum(tuple(int(q) for q in starts[0]))[None]
  else:  # a loop, so that one offset's per-example gradients are live at a time (unrolled,
    # XLA schedules every offset's [B, C, O] at once: ResNet-18's Fisher took 2.9x a train
    # step's memory, 0.8x with the loop)
    table = jnp.asarray(starts)
    def body(k, acc):
      return acc.at[k].set(offset_sum(tuple(table[k])))
    s = lax.fori_loop(0, len(starts), body,
                      jnp.zeros((len(starts), groups, cg, og), jnp.float32))  # [F, G, Cg, Og]
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


RULES = {"dense": _dot, "rows": _dot, "conv": _conv, "embed": _embed}
