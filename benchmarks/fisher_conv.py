"""Whole-model empirical Fisher vs one training epoch, on a CNN and on the MLP.

    python -m benchmarks.fisher_conv [--examples=2048] [--mlp_examples=8192] [--batch_size=128]

Models: the CNN of flax/examples/mnist (linen: Conv 32 3x3, ReLU, avg-pool 2x2, Conv 64 3x3, ReLU,
avg-pool 2x2, Dense 256, ReLU, Dense 10) and the MLP 784-400-400 (+ Dense 10). For each, both
jitted and timed with compilation excluded (``--repeats`` interleaved pairs; median and min),
on the same examples and batch size: one training epoch (a Python loop over one jitted SGD-momentum step: forward +
backward + update) and ``fisher_diagonal(kind="empirical")`` over every parameter (``method="auto"``: fast
exact paths; ``vmap(grad)`` on ``--vmap_examples`` only, per example). The machine load
(``uptime``) is recorded before and after, since this 2-core machine is shared.

Data: the first ``--examples`` MNIST training images when the prepared data set is found, else
random images of the same shape (timings do not depend on the values).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from ewc_jax import fisher_diagonal, fisher_plan


class CNN(nn.Module):
  """flax/examples/mnist's CNN."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(features=32, kernel_size=(3, 3))(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(features=64, kernel_size=(3, 3))(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(features=256)(x))
    return nn.Dense(features=10)(x)


class MLP(nn.Module):
  """The standard continual-learning MLP 784-400-400 with a 10-class head."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(400)(x))
    x = nn.relu(nn.Dense(400)(x))
    return nn.Dense(10)(x)


def load(n: int):
  try:
    from experiments import data  # pylint: disable=import-outside-toplevel
    ds = data.load_dataset("mnist", download=False)
    x, y, source = ds.train_images[:n], ds.train_labels[:n], f"mnist train[:{n}]"
  except Exception:  # pylint: disable=broad-except  # no prepared data: same-shaped random data
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    y, source = rng.integers(0, 10, n).astype(np.int32), f"random, {n} examples"
  return jnp.asarray(x, jnp.float32) / 255.0, jnp.asarray(y, jnp.int32), source


def uptime() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def measure(name, module, x, y, batch_size, vmap_examples, repeats):
  params = module.init(jax.random.key(0), x[:1])["params"]
  logits_fn = lambda p, xb: module.apply({"params": p}, xb)  # noqa: E731
  n = x.shape[0] - x.shape[0] % batch_size
  x, y = x[:n], y[:n]
  tx = optax.sgd(0.05, momentum=0.9)

  @jax.jit
  def step(p, s, xb, yb):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, xb), yb).mean()
    l, g = jax.value_and_grad(loss)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  # One epoch as users run it: a Python loop over the jitted step (a lax.scan of the same step
  # is 30x slower for the CNN on XLA's CPU backend: its conv kernel gradients inside a loop).
  batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]
  def epoch():
    p, s = params, tx.init(params)
    for xb, yb in batches:
      p, s, l = step(p, s, xb, yb)
    return jax.block_until_ready((p, s, l))

  def fisher(method):
    return jax.jit(lambda p, xs, ys: fisher_diagonal(logits_fn, p, xs, ys, batch_size=batch_size,
                                                     method=method))
  auto = fisher("auto")
  run_fisher = lambda: jax.block_until_ready(auto(params, x, y))  # noqa: E731
  # Interleaved (epoch, Fisher) pairs, so that both see the same load on this shared machine.
  epoch(), run_fisher()                                             # compile, warm up
  t_e, t_f = [], []
  for _ in range(repeats):
    for fn, times in ((epoch, t_e), (run_fisher, t_f)):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
  t_epoch = {"median_s": statistics.median(t_e), "min_s": min(t_e)}
  t_auto = {"median_s": statistics.median(t_f), "min_s": min(t_f)}
  m = min(vmap_examples, n)
  slow = fisher("vmap")
  t_vmap = common.time_call(lambda: jax.block_until_ready(slow(params, x[:m], y[:m])),
                            repeats=1)
  a, b = auto(params, x[:m], y[:m]), slow(params, x[:m], y[:m])
  err = max(float(jnp.max(jnp.abs(u - v)) / jnp.maximum(jnp.max(jnp.abs(v)), 1e-30))
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  plan = {leaf.path: leaf.method for leaf in fisher_plan(logits_fn, params, x)}
  row = {"model": name, "examples": n, "batch_size": batch_size,
         "train_epoch_s": t_epoch["median_s"], "fisher_s": t_auto["median_s"],
         "fisher_over_epoch": t_auto["median_s"] / t_epoch["median_s"],
         "fisher_over_epoch_min": t_auto["min_s"] / t_epoch["min_s"],
         "train_epoch_min_s": t_epoch["min_s"], "fisher_min_s": t_auto["min_s"],
         "vmap_examples": m, "vmap_fisher_s": t_vmap["median_s"],
         "vmap_fisher_over_epoch_estimate": t_vmap["median_s"] * n / m / t_epoch["median_s"],
         "auto_vs_vmap_max_rel_err": err, "plan": plan}
  print(row, flush=True)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--examples", type=int, default=2048, help="CNN examples")
  parser.add_argument("--mlp_examples", type=int, default=8192)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--vmap_examples", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  x, y, source = load(max(args.examples, args.mlp_examples))
  load_before = uptime()
  rows = [measure("cnn (flax/examples/mnist)", CNN(), x[:args.examples], y[:args.examples],
                  args.batch_size, args.vmap_examples, args.repeats),
          measure("mlp 784-400-400-10", MLP(), x[:args.mlp_examples], y[:args.mlp_examples],
                  args.batch_size, args.vmap_examples, args.repeats)]
  common.write("fisher_conv", {"data": source, "uptime_before": load_before,
                               "uptime_after": uptime(), "rows": rows,
                               "goal": "cnn fisher_over_epoch <= 2, mlp <= 1"})


if __name__ == "__main__":
  main()
