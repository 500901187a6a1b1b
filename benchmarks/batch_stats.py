"""Shared vs per-task BatchNorm running statistics: task-incremental Split MNIST with resnet18.

    python -m benchmarks.batch_stats [--max_examples=1000] [--epochs=3] [--seeds=0,1] [--data_dir=...]

The runner keeps one copy of the backbone's running statistics (``batch_stats``): every train
step updates it, every task is evaluated with it, and EWC does not hold it (it consolidates
parameters only). This measures what keeping a copy per task would change. After each task the
running statistics are snapshotted; at the end every task is evaluated with the final parameters
and (a) the final shared statistics: the runner's last accuracy row, (b) that task's own
snapshot, taken at the end of its training, as a per-task copy would be (possible in
task-incremental learning, where the task id is known at test time).

Data: the prepared MNIST (``--data_dir``, default ``$TFDS_DATA_DIR``), the first
``--max_examples`` train and test examples of each task (sized for a CPU); without it, nothing
is measured (the script says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from benchmarks import common
from ewc_jax import continual
from ewc_jax.continual import metrics
from ewc_jax.continual import step as step_lib


def task_sequences(data_dir, max_examples):
  from experiments import data, tasks  # pylint: disable=import-outside-toplevel
  ds = data.load_dataset("mnist", data_dir=data_dir, download=False)
  return tuple(tasks.split_by_classes(x, y, max_examples=max_examples)
               for x, y in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)))


def measure(cfg, train_data, test_data):
  """The runner's accuracy matrix and the last row evaluated with each task's own snapshot."""
  net = continual.make_network(cfg, [[0, 1]] * int(train_data.inputs.shape[0]))
  snapshots = {}

  def hook(rs, reason):
    if reason == "task":
      snapshots[rs.task - 1] = rs.train_state.model_state

  t0 = time.perf_counter()
  result = continual.run(cfg, net, train_data, test_data, on_checkpoint=hook)
  seconds = time.perf_counter() - t0
  evaluate = jax.jit(lambda state, data, t: step_lib.evaluate(net, step_lib.scale_pixels,
                                                           result.params, data, t, state))
  num_tasks = len(snapshots)
  own = [float(evaluate(snapshots[t], test_data, num_tasks - 1)[t]) for t in range(num_tasks)]
  shared = result.acc_matrix[-1]
  return {"algo": cfg.algo, "seed": cfg.seed, "seconds": seconds,
          "shared_last_row": shared.tolist(), "per_task_last_row": own,
          "shared_average_accuracy": float(np.mean(shared)),
          "per_task_average_accuracy": float(np.mean(own)),
          "shared_bwt": metrics.summarize(result.acc_matrix)["bwt"],
          "acc_matrix": result.acc_matrix.tolist()}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--max_examples", type=int, default=1000)
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--width", type=int, default=20)
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args()
  try:
    train_data, test_data = task_sequences(args.data_dir, args.max_examples)
  except Exception as err:  # pylint: disable=broad-except  # no prepared MNIST here
    print(f"no prepared MNIST ({err}); nothing measured")
    return
  base = continual.Config(backbone="resnet18", width=args.width, epochs=args.epochs,
                          batch_size=args.batch_size, lam=10000.0)
  rows = []
  for algo in ("ewc", "finetune"):
    for seed in (int(s) for s in args.seeds.split(",")):
      row = measure(dataclasses.replace(base, algo=algo, seed=seed), train_data, test_data)
      rows.append(row)
      print({k: v for k, v in row.items() if k != "acc_matrix"}, flush=True)
  summary = {}
  for algo in ("ewc", "finetune"):
    mine = [r for r in rows if r["algo"] == algo]
    summary[algo] = {k: [float(np.mean([r[k] for r in mine])), float(np.std([r[k] for r in mine]))]
                     for k in ("shared_average_accuracy", "per_task_average_accuracy")}
  common.write("batch_stats", {"protocol": {
      "benchmark": "split_mnist task-incremental",
      "max_examples_per_task": {"train": args.max_examples, "test": args.max_examples},
      "backbone": "resnet18", "width": args.width, "epochs": args.epochs, "batch_size": args.batch_size,
      "lam": base.lam, "optimizer": "adam", "lr": base.lr},
      "summary_mean_std": summary, "rows": rows})


if __name__ == "__main__":
  main()
