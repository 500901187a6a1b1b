"""Run by tests/test_sharding.py in a process with 8 host devices (XLA_FLAGS set there): every
function on parameters sharded over a mesh returns the parameters' shardings, equals the
unsharded result, and compiles no all-gather of a whole parameter. Prints one JSON line."""

from __future__ import annotations

import json
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from shard_compare import compare  # a sibling file: this runs as a script

import ewc_jax
from ewc_jax import (Anchor, add_ewc_gradient, empty_merged, ewc_loss, fisher_diagonal,
                     fisher_from_batches, merge_anchor, restore_anchors, save_anchors,
                     stack_anchors)


def model(p, x):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  return h @ p["w2"] + p["b2"]


def check(mesh_shape):
  names = ("data",) if len(mesh_shape) == 1 else ("data", "model")
  mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), names)
  split = names[-1]                      # FSDP on (8,): the params split over 'data' too
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(16, 32)), "b1": rng.normal(size=(32,)),
            "w2": rng.normal(size=(32, 8)), "b2": rng.normal(size=(8,))}
  params = jax.tree.map(lambda a: jnp.asarray(0.3 * a, jnp.float32), params)
  specs = {"w1": P(None, split), "b1": P(split), "w2": P(split, None), "b2": P()}
  put = lambda tree: jax.tree.map(  # noqa: E731
      lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)
  sp = put(params)
  x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 8, 64), jnp.int32)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  ys = jax.device_put(y, NamedSharding(mesh, P("data")))
  problems = []

  def same(name, got, want, like):
    compare(problems, name, got, want, like)

  f_ref = fisher_diagonal(model, params, x, y, batch_size=16)
  f = fisher_diagonal(model, sp, xs, ys, batch_size=16)
  same("fisher_diagonal", f, f_ref, sp)
  batches = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 64, 16)]
  same("fisher_from_batches", fisher_from_batches(model, sp, batches), f_ref, sp)

  anchor, anchor_ref = Anchor(sp, f), Anchor(params, f_ref)
  same("Anchor.params", anchor.params, params, sp)
  moved = jax.tree.map(lambda a: a + 0.1, sp)
  moved_ref = jax.tree.map(lambda a: a + 0.1, params)
  grad = jax.jit(jax.grad(lambda p, a: ewc_loss(p, (a,), lam=3.0)))
  same("grad(ewc_loss)", grad(moved, anchor), jax.grad(
      lambda p: ewc_loss(p, (anchor_ref,), lam=3.0))(moved_ref), sp)
  hlo = grad.lower(moved, anchor).compile().as_text()
  full = {tuple(np.shape(a)) for a in jax.tree.leaves(params) if np.ndim(a)}
  gathered = [tuple(int(d) for d in g.split(",") if d) for g in
              re.findall(r"= f32\[([\d,]*)\]\{[^}]*\} all-gather", hlo)]
  if any(g in full for g in gathered):
    problems.append(f"grad(ewc_loss) gathers a whole parameter: {gathered}")
  value = float(ewc_loss(moved, (anchor,), lam=3.0))
  if abs(value - float(ewc_loss(moved_ref, (anchor_ref,), lam=3.0))) > 1e-5 * abs(value):
    problems.append("ewc_loss value differs")
  tx = add_ewc_gradient((anchor,), lam=3.0)
  upd, _ = tx.update(jax.tree.map(jnp.zeros_like, moved), tx.init(moved), moved)
  same("add_ewc_gradient", upd, jax.grad(lambda p: ewc_loss(p, (anchor_ref,), lam=3.0))(
      moved_ref), sp)
  stacked = stack_anchors([anchor, anchor])
  same("stack_anchors", jax.tree.map(lambda a: a[0], stacked.params), params, sp)
  merged = merge_anchor(empty_merged(sp), anchor)
  same("merge_anchor.weight", merged.weight, f_ref, sp)
  with tempfile.TemporaryDirectory() as tmp:
    save_anchors(f"{tmp}/a", (anchor,))
    back = restore_anchors(f"{tmp}/a", like=(anchor,))
  same("restore_anchors", back[0].importance, f_ref, sp)
  fisher_hlo = jax.jit(lambda p, a, b: fisher_diagonal(model, p, a, b, batch_size=16)).lower(
      sp, xs, ys).compile().as_text()
  gathered = [tuple(int(d) for d in g.split(",") if d) for g in
              re.findall(r"= f32\[([\d,]*)\]\{[^}]*\} all-gather", fisher_hlo)]
  if any(g in full for g in gathered):
    problems.append(f"fisher_diagonal gathers a whole parameter: {gathered}")
  return problems


def main():
  assert len(jax.devices()) == 8, jax.devices()
  out = {str(shape): check(shape) for shape in ((8,), (2, 4))}
  out["version"] = ewc_jax.__version__
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
