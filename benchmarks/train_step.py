"""Examples/s of the jitted EWC train step (MLP 784-400-400, 2-way heads) vs anchors and batch.

    python -m benchmarks.train_step [--steps=64]

Steps run as in training: the runner's train chunk over batches drawn from device-resident data.
Reported also as a fraction of this machine's measured float32 matmul peak (a large jnp.dot).
FLOPs per example (training): forward 2·Σ(in·out) + weight gradients 2·Σ(in·out) + input
gradients of every layer but the first 2·Σ_{l>1}(in·out).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks import common
from ewc_jax import algorithms, heads
from ewc_jax.continual import step as step_lib
from ewc_jax.continual import task_data

SIZES = (784, 400, 400, 2)


def flops_per_example(sizes=SIZES) -> float:
  layers = list(zip(sizes[:-1], sizes[1:]))
  mac = sum(i * o for i, o in layers)
  return 2.0 * mac * 2 + 2.0 * sum(i * o for i, o in layers[1:])


def filled_memory(algo, backbone, num_anchors, key):
  memory = algo.init(backbone, num_anchors + 1)
  for k in range(num_anchors):
    k1, k2, key = jax.random.split(key, 3)
    ref = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(k1, x.shape), backbone)
    imp = jax.tree.map(lambda x: jax.random.uniform(k2, x.shape), backbone)
    memory = algo.consolidate(memory, ref, imp, k, algorithms.Hyper())
  return memory


def bench(algo, num_anchors, batch_size, steps):
  net = heads.task_incremental(num_tasks=2, classes_per_task=2)
  params = heads.init_params(net, jax.random.key(0), jnp.ones((1, 784)))
  tx = step_lib.make_optimizer()
  n = batch_size * steps
  x = jax.random.randint(jax.random.key(1), (1, n, 28, 28, 1), 0, 255).astype(jnp.uint8)
  y = jax.random.randint(jax.random.key(2), (1, n), 0, 2)
  data = task_data.TaskData(x, y, jnp.array([n], jnp.int32))
  memory = filled_memory(algo, heads.consolidated(net, params, "shared"), num_anchors,
                         jax.random.key(3))
  hyper = algorithms.Hyper(*(jnp.float32(v) for v in (10.0, 2.0, 1.0, 1e-3)))
  order = step_lib.epoch_order(jax.random.key(4), data.counts[0], n, n)
  chunk = jax.jit(functools.partial(step_lib.train_chunk, step_lib.Step(
      net, algo, tx, batch_size=batch_size, num_steps=steps)))
  state = step_lib.init_train_state(tx, params, 1e-3)
  inputs = step_lib.ChunkInputs(data=data, order=order, start_step=jnp.int32(0),
                                task_index=jnp.int32(0), memory=memory, hyper=hyper)
  run = lambda: jax.block_until_ready(chunk(state, inputs))  # noqa: E731
  t = common.time_call(run, repeats=5)
  return {"examples_per_s": n / t["median_s"], "ms_per_step": 1e3 * t["median_s"] / steps}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=64)
  args = parser.parse_args()
  peak = common.matmul_peak_flops()
  fpe = flops_per_example()
  variants = {
      "finetune": (algorithms.finetune(), [0]),
      "ewc_p2": (algorithms.ewc(p=2.0), [1, 4, 20]),   # p = 2: merged statistics, one pass
      "ewc_p1": (algorithms.ewc(p=1.0), [1, 4, 20]),   # p != 2: one pass per anchor
  }
  rows = []
  for batch_size in (128, 1024):
    steps = max(8, args.steps * 128 // batch_size)
    for name, (algo, counts) in variants.items():
      for k in counts:
        r = bench(algo, k, batch_size, steps)
        r.update(variant=name, anchors=k, batch_size=batch_size,
                 fraction_of_matmul_peak=r["examples_per_s"] * fpe / peak)
        rows.append(r)
        print(r, flush=True)
  base = {r["batch_size"]: r["ms_per_step"] for r in rows if r["variant"] == "finetune"}
  for r in rows:
    r["overhead_vs_finetune"] = r["ms_per_step"] / base[r["batch_size"]] - 1.0
  common.write("train_step", {"matmul_peak_gflops": peak / 1e9,
                              "train_flops_per_example": fpe, "rows": rows})


if __name__ == "__main__":
  main()
