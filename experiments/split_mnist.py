r"""Split MNIST, task-incremental: 5 tasks {0,1},{2,3},{4,5},{6,7},{8,9}, a 2-way head per task.

    python -m experiments.split_mnist --algo=ewc
    python -m experiments.split_mnist --algo=finetune --workdir=runs/finetune

Default protocol (the one the PyTorch peers are measured on): MLP 784-400-400 ReLU, Adam lr 1e-3
restarted at each task, batch 128, 2 epochs per task, pixels / 255, empirical Fisher,
penalty (lam/2) * sum_k sum_i F_ki (theta_i - theta*_ki)^2 with lam = 1000.
Writes ``<workdir>/results.json``.
"""

import time

_START = time.perf_counter()

# pylint: disable=wrong-import-position
from absl import app  # noqa: E402

from experiments import cli  # noqa: E402

cli.define_flags(default_workdir="runs/split_mnist")
FLAGS = cli.FLAGS


def train_and_evaluate(config, workdir, *, import_seconds: float = 0.0) -> dict:
  """Loads data, runs the protocol, prints the accuracy matrix, writes ``results.json``."""
  from ewc_jax import continual, heads  # pylint: disable=import-outside-toplevel
  from experiments import data, tasks  # pylint: disable=import-outside-toplevel

  num_tasks, max_examples = cli.check_subset_flags(len(tasks.SPLIT_MNIST_CLASSES))
  groups = tasks.SPLIT_MNIST_CLASSES[:num_tasks]
  t0 = time.perf_counter()
  ds = data.load_dataset("mnist", data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir)
  train = tasks.to_device(tasks.split_by_classes(ds.train_images, ds.train_labels, groups,
                                                 max_examples=max_examples))
  test = tasks.to_device(tasks.split_by_classes(ds.test_images, ds.test_labels, groups,
                                                max_examples=max_examples))
  data_seconds = time.perf_counter() - t0

  net = heads.task_incremental(num_tasks=num_tasks, classes_per_task=2, hidden=config.hidden)
  result = continual.run(config, net, train, test, progress=cli.make_progress(FLAGS.progress))
  timings = {"import": import_seconds, "data": data_seconds, **result.timings,
             "data_from_cache": bool(ds.from_cache)}
  timings["total"] = time.perf_counter() - _START
  record = cli.results_record(config, result, timings, {
      "name": "split_mnist", "scenario": "task", "dataset": f"{ds.name}:{ds.version}",
      "class_groups": [list(g) for g in groups], "max_examples": max_examples})
  cli.write_json_atomic(workdir / "results.json", record)

  print(f"\nSplit MNIST (task-incremental), algo={config.algo}, lam={config.lam:g}, "
        f"fisher={config.fisher}, seed={config.seed}")
  print(cli.format_matrix(result.acc_matrix))
  print(f"average accuracy {100 * record['average_accuracy']:.2f}  "
        f"BWT {100 * record['bwt']:+.2f}  mean forgetting {100 * record['mean_forgetting']:.2f}")
  print("seconds: " + "  ".join(f"{k} {v:.2f}" for k, v in timings.items()
                                if isinstance(v, float)))
  print(f"wrote {workdir / 'results.json'}")
  return record


def main(argv):
  cli.run_main(train_and_evaluate, argv, _START)


if __name__ == "__main__":
  app.run(main)
