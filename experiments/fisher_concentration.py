r"""Why van de Ven 2025's Fisher kinds need λ orders of magnitude apart: one trained network.

Trains the MLP on task 1 of Split MNIST with the blog's protocol (2,000 iterations, batch 128,
Adam lr 1e-3, PyTorch initialisation), then computes every kind of Fisher of that network on
the task's training examples and prints (and writes as JSON) each one's total
:math:`\sum_i F_i` and how concentrated the exact Fisher is on a few examples. For a 2-way head
the exact Fisher of example n with respect to its logits is :math:`2 p_n (1 - p_n)` times the
identity-like 2×2 block (p_n: the probability of class 0), so :math:`w_n = p_n(1-p_n)` is the
example's weight in the exact Fisher; the sampled Fisher draws the non-argmax label with
probability :math:`1 - \max(p_n, 1 - p_n)`, so :math:`\sum_n (1 - \max_c p_{nc})` is the
expected number of such draws in the task.

    python -m experiments.fisher_concentration --out=docs/fisher_concentration.json
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import metadata
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import continual
from ewc_jax import fisher
from ewc_jax import heads
from ewc_jax import subset
from ewc_jax.continual import step as train_lib
from experiments import config as config_lib
from experiments import tasks
from experiments import train


def measure(seed: int = 0, steps: int = 2000, draws: int = 5, subset_size: int = 500) -> dict:
  """The network of ``seed`` after ``steps`` iterations on task 1; every kind's total and the
  concentration of the exact Fisher's example weights."""


  exp = config_lib.make("split_mnist", algo="finetune", num_tasks=1, steps_per_task=steps,
                        reset_optimizer=False, init="pytorch", seed=seed)
  exp.validate()
  ds = train.load_dataset(exp)
  exp = exp.resolved(ds.num_classes)
  built = train.build_tasks(exp, ds, exp.run)
  data, test = tasks.to_device(built.train), tasks.to_device(built.test)
  net = continual.make_network(exp.run, built.class_groups)
  t0 = time.perf_counter()
  result = continual.run(exp.run, net, data, test)
  train_seconds = time.perf_counter() - t0
  theta = heads.consolidated(net, result.params, "shared")
  logits_of = heads.consolidated_logits_fn(net, result.params, 0, result.model_state)

  def fn(th, xb):
    return logits_of(th, train_lib.scale_pixels(xb))

  n = int(data.counts[0])
  x, y = data.inputs[0][:n], data.labels[0][:n]

  def total(tree):
    return float(sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree)))

  kinds = {k: total(fisher.fisher_diagonal(fn, theta, x, y, kind=k, batch_size=128,
                                           key=jax.random.key(0)))
           for k in ("true", "empirical", "predicted", "batch_squared")}
  sampled = [total(fisher.fisher_diagonal(fn, theta, x, y, kind="sampled", batch_size=128,
                                          key=jax.random.key(d))) for d in range(draws)]
  rows = [np.asarray(subset.random_rows(jax.random.key(d), jnp.ones(n, bool), subset_size))
          for d in range(draws)]
  subsets = [total(fisher.fisher_diagonal(fn, theta, x[r], y[r], kind="true", batch_size=128))
             for r in rows]
  p = np.asarray(jax.nn.softmax(fn(theta, x).astype(jnp.float32), axis=-1), np.float64)
  w = p[:, 0] * p[:, 1]
  top = np.sort(w)[::-1]
  return {
      "seed": seed, "steps": steps, "examples": n, "train_seconds": train_seconds,
      "test_accuracy_task1": float(result.acc_matrix[0, 0]),
      "fisher_total": {**kinds, "sampled": sampled, f"true_{subset_size}": subsets},
      "exact_weight": {
          "sum": float(w.sum()), "median": float(np.median(w)),
          "share_top_10": float(top[:10].sum() / w.sum()),
          "share_top_1_percent": float(top[:max(1, n // 100)].sum() / w.sum()),
          "share_of_a_random_500_expected": subset_size / n,
      },
      "expected_non_argmax_draws": float((1 - p.max(axis=1)).sum()),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="the JSON to write")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  record = {**measure(args.seed),
            "versions": {n: metadata.version(n) for n in ("jax", "jaxlib", "flax", "optax",
                                                          "numpy", "ml_dtypes")}}
  Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
  print(json.dumps(record, indent=2))


if __name__ == "__main__":
  main()
