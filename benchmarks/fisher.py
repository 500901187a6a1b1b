"""Examples/s of each Fisher kind over one Split MNIST task, relative to one training epoch.

    python -m benchmarks.fisher [--vmap_examples=1024]

Data: task 1 of Split MNIST (digits 0/1, 12,665 train examples) from the prepared MNIST when it is
found, else random images of the same size. The generic ``vmap(grad)`` path is timed on a subset
(``--vmap_examples``) and reported per example, since over the whole task it takes minutes.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from ewc_jax import algorithms, fisher, heads
from ewc_jax.continual import step as step_lib
from ewc_jax.continual import task_data


def task_one():
  try:
    from experiments import data, tasks  # pylint: disable=import-outside-toplevel
    ds = data.load_dataset("mnist", download=False)
    t = tasks.split_by_classes(ds.train_images, ds.train_labels, tasks.SPLIT_MNIST_CLASSES[:1])
    return np.asarray(t.inputs[0]), np.asarray(t.labels[0]), "mnist task 1 (0 vs 1)"
  except Exception:  # pylint: disable=broad-except  # no prepared data: same-sized random task
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (12665, 28, 28, 1), dtype=np.uint8),
            rng.integers(0, 2, 12665).astype(np.int32), "random, 12665 examples")


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--vmap_examples", type=int, default=1024)
  parser.add_argument("--batch_size", type=int, default=256)
  args = parser.parse_args()
  x_u8, y, source = task_one()
  n = len(y)
  net = heads.task_incremental(num_tasks=1, classes_per_task=2)
  params = heads.init_params(net, jax.random.key(0), jnp.ones((1, 784)))
  logits_fn = heads.backbone_logits_fn(net, params["heads"], 0)
  x = step_lib.scale_pixels(jnp.asarray(x_u8))
  y = jnp.asarray(y)

  # One plain training epoch over the same data (batch 128, as in the protocol).
  tx = step_lib.make_optimizer()
  steps = -(-n // 128)
  data = task_data.TaskData(jnp.asarray(x_u8)[None], y[None], jnp.array([n], jnp.int32))
  order = step_lib.epoch_order(jax.random.key(1), data.counts[0], n, steps * 128)
  chunk = jax.jit(functools.partial(step_lib.train_chunk, step_lib.Step(
      net, algorithms.finetune(), tx, batch_size=128, num_steps=steps)))
  state = step_lib.init_train_state(tx, params, 1e-3)
  inputs = step_lib.ChunkInputs(data=data, order=order, start_step=jnp.int32(0),
                                task_index=jnp.int32(0), memory=(), hyper=algorithms.Hyper())
  epoch = common.time_call(lambda: jax.block_until_ready(chunk(state, inputs)), repeats=3)

  rows = []
  def run(kind, method, xs, ys, batch_size):
    f = jax.jit(lambda p, xs, ys, key: fisher.fisher_diagonal(
        logits_fn, p, xs, ys, kind=kind, batch_size=batch_size, key=key, method=method))
    t = common.time_call(lambda: jax.block_until_ready(
        f(params["backbone"], xs, ys, jax.random.key(2))), repeats=3)
    row = {"kind": kind, "method": method, "examples": int(xs.shape[0]),
           "batch_size": batch_size, "seconds": t["median_s"],
           "examples_per_s": xs.shape[0] / t["median_s"]}
    row["seconds_per_task_estimate"] = n / row["examples_per_s"]
    row["relative_to_train_epoch"] = row["seconds_per_task_estimate"] / epoch["median_s"]
    rows.append(row)
    print(row, flush=True)

  for kind in fisher.KINDS:
    run(kind, "auto", x, y, 128 if kind == "batch_squared" else args.batch_size)
  m = args.vmap_examples
  run("empirical", "vmap", x[:m], y[:m], args.batch_size)
  common.write("fisher", {"data": source, "task_examples": n,
                          "train_epoch_seconds": epoch["median_s"], "rows": rows})


if __name__ == "__main__":
  main()
