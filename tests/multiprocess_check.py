"""One process of tests/test_multiprocess.py: ``python multiprocess_check.py PORT ID COUNT DIR
[failID]`` (``failID``: process ID raises once ``jax.distributed`` is up).

Joins ``jax.distributed`` on 127.0.0.1:PORT as process ID of COUNT (4 host devices each, set by
the test through XLA_FLAGS), builds meshes over every device of every process, (8,) FSDP and
(2, 4) ('data', 'model'), and checks fisher_diagonal (also with padding rows masked out),
fisher_from_batches (each process feeding its own rows, the global batch made by
jax.make_array_from_process_local_data), Anchor, ewc_loss and its gradient, add_ewc_gradient,
stack_anchors, merge_anchor and save/restore_anchors (to the shared folder DIR) against the same
computation on one local device, unsharded, and that a bad label or a negative importance held
by one process only is refused by every process. Each process checks the shards it holds
(values to 1e-6, shardings kept) and prints one JSON line:
``{"process": ID, "(8,)": [problems], "(2, 4)": [problems]}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from shard_compare import compare  # a sibling file: this runs as a script

from ewc_jax import (Anchor, add_ewc_gradient, empty_merged, ewc_loss, fisher_diagonal,
                     fisher_from_batches, merge_anchor, restore_anchors, save_anchors,
                     stack_anchors)

N, BATCH = 64, 16


def model(p, x):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  return h @ p["w2"] + p["b2"]


def data():
  """The global parameters and data (every process makes the same; each then keeps its part)."""
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(16, 32)), "b1": rng.normal(size=(32,)),
            "w2": rng.normal(size=(32, 8)), "b2": rng.normal(size=(8,))}
  params = jax.tree.map(lambda a: (0.3 * a).astype(np.float32), params)
  x = rng.normal(size=(N, 16)).astype(np.float32)
  y = rng.integers(0, 8, N).astype(np.int32)
  return params, x, y


def check(mesh_shape, folder):
  names = ("data",) if len(mesh_shape) == 1 else ("data", "model")
  mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), names)
  split = names[-1]                      # FSDP on (8,): the params split over 'data' too
  params, x, y = data()
  specs = {"w1": P(None, split), "b1": P(split), "w2": P(split, None), "b2": P()}
  # Global parameters from host values every process holds in full (a restore or an init
  # would make them the same way): each process places its own shards.
  def place(tree):
    return jax.tree.map(lambda a, s: jax.make_array_from_callback(
        a.shape, NamedSharding(mesh, s), lambda i, a=a: a[i]), tree, specs)
  sp = place(params)
  rows = NamedSharding(mesh, P("data"))
  # This process's rows: the contiguous block of the global batch its devices hold on 'data'.
  mine = sorted({rows.addressable_devices_indices_map((N,))[d][0].indices(N)[:2]
                 for d in rows.addressable_devices})
  lo, hi = mine[0][0], mine[-1][1]
  assert all(a[1] == b[0] for a, b in zip(mine, mine[1:])), mine   # one contiguous block
  xs = jax.make_array_from_process_local_data(rows, x[lo:hi], (N, 16))
  ys = jax.make_array_from_process_local_data(rows, y[lo:hi], (N,))
  problems = []

  def same(name, got, want, like):
    compare(problems, name, got, want, like)

  f_ref = fisher_diagonal(model, params, x, y, batch_size=BATCH)
  f = fisher_diagonal(model, sp, xs, ys, batch_size=BATCH)
  same("fisher_diagonal", f, f_ref, sp)

  # Uneven shares: the last process's last rows are padding, weight 0 (counted in neither the
  # sum nor N).
  keep = np.arange(N) < N - 10
  masked = fisher_diagonal(model, sp, xs, ys, batch_size=BATCH,
                           mask=jax.make_array_from_process_local_data(
                               rows, keep[lo:hi].astype(np.float32), (N,)))
  same("fisher_diagonal(mask=)", masked,
       fisher_diagonal(model, params, x[keep], y[keep], batch_size=BATCH), sp)

  # A multi-host input pipeline: each process reads its own BATCH/2 rows per step, and the
  # global batch of BATCH rows is made of every process's rows.
  local = hi - lo
  step = BATCH * local // N
  batches = ((jax.make_array_from_process_local_data(rows, x[lo + i:lo + i + step], (BATCH, 16)),
              jax.make_array_from_process_local_data(rows, y[lo + i:lo + i + step], (BATCH,)))
             for i in range(0, local, step))
  same("fisher_from_batches", fisher_from_batches(model, sp, batches), f_ref, sp)

  anchor, anchor_ref = Anchor(sp, f), Anchor(params, f_ref)
  same("Anchor.params", anchor.params, params, sp)
  same("Anchor.importance", anchor.importance, f_ref, sp)
  moved_ref = jax.tree.map(lambda a: a + np.float32(0.1), params)
  moved = place(moved_ref)
  loss = jax.jit(jax.value_and_grad(lambda p, a: ewc_loss(p, a, lam=3.0)))
  value_ref, grad_ref = loss(moved_ref, (anchor_ref,))
  value, grad = loss(moved, (anchor,))
  same("grad(ewc_loss)", grad, grad_ref, sp)
  if abs(float(value) - float(value_ref)) > 1e-6 * abs(float(value_ref)):
    problems.append(f"ewc_loss value {float(value)} != {float(value_ref)}")
  zeros = place(jax.tree.map(np.zeros_like, params))
  tx = add_ewc_gradient((anchor,), lam=3.0)      # anchors fixed: eager (jit cannot close over
  upd, _ = tx.update(zeros, tx.init(moved), moved)  # an array spread over several processes)
  same("add_ewc_gradient", upd, grad_ref, sp)
  tx = add_ewc_gradient(lam=3.0)                 # anchors as arguments of a jitted step
  upd, _ = jax.jit(tx.update)(zeros, tx.init(moved), moved, ewc_anchors=(anchor,))
  same("add_ewc_gradient(ewc_anchors=)", upd, grad_ref, sp)
  stacked = stack_anchors([anchor, anchor])
  same("stack_anchors", jax.tree.map(lambda a: a[1], stacked.importance), f_ref, sp)
  _, grad2 = loss(moved, stacked)
  same("grad(ewc_loss(stacked))", grad2, jax.tree.map(lambda g: 2 * g, grad_ref), sp)
  merged = jax.jit(merge_anchor)(empty_merged(sp), anchor)
  same("merge_anchor.weight", merged.weight, f_ref, sp)
  same("merge_anchor.center", merged.center, params, sp)
  path = f"{folder}/anchors{len(mesh_shape)}"
  save_anchors(path, (anchor,))
  back = restore_anchors(path, like=(anchor,))
  same("restore_anchors.params", back[0].params, params, sp)
  same("restore_anchors.importance", back[0].importance, f_ref, sp)

  # Checks that read values still refuse bad input, on every process alike: a label out of
  # range in the last process's rows, a negative importance in a shard of the last process.
  bad_y = y.copy()
  bad_y[N - 3] = 8
  expect(lambda: fisher_diagonal(model, sp, xs, jax.make_array_from_process_local_data(
      rows, bad_y[lo:hi], (N,)), batch_size=BATCH), "labels[61]=8 (1 labels out of range",
         problems)
  bad_f = jax.tree.map(np.array, f_ref)
  bad_f["w1"][3, 30] = -1.0
  expect(lambda: Anchor(sp, place(bad_f)), "leaf ['w1'] has value -1.", problems)
  return problems


def expect(call, message, problems):
  """Records a problem unless ``call()`` raises a ValueError whose text holds ``message``."""
  try:
    call()
  except ValueError as err:
    if message not in str(err):
      problems.append(f"expected {message!r}, got {err}")
    return
  problems.append(f"no error, expected {message!r}")


def main(argv):
  port, pid, count, folder = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=count,
                             process_id=pid, initialization_timeout=60,
                             heartbeat_timeout_seconds=10)
  if argv[5:] == [f"fail{pid}"]:  # tests/test_multiprocess.py: a peer that dies mid-run
    raise RuntimeError(f"process {pid} fails on purpose")
  assert jax.process_count() == count and len(jax.devices()) == 4 * count, jax.devices()
  out = {"process": jax.process_index()}
  out.update({str(shape): check(shape, folder) for shape in ((8,), (2, 4))})
  print(json.dumps(out), flush=True)
  jax.distributed.shutdown()
  return 0


if __name__ == "__main__":
  try:
    code = main(sys.argv)
  except BaseException:  # noqa: BLE001
    # Exit now, as a crashed host would: the normal exit would wait in jax.distributed's
    # shutdown barrier for the peers (up to its shutdown timeout).
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
  sys.exit(code)
