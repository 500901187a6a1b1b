r"""Split MNIST: 5 tasks {0,1},{2,3},{4,5},{6,7},{8,9}.

    python -m experiments.split_mnist --algo=ewc
    python -m experiments.split_mnist --algo=finetune --workdir=runs/finetune
    python -m experiments.split_mnist --scenario=class --algo=online_ewc --gamma=0.9 --seeds=0,1,2

Default protocol (the one the PyTorch peers are measured on): task-incremental (a 2-way head
per task), MLP 784-400-400 ReLU, Adam lr 1e-3 restarted at each task, batch 128, 2 epochs per
task, pixels / 255, empirical Fisher, penalty (lam/2) * sum_k sum_i F_ki (theta_i - theta*_ki)^2
with lam = 1000. Writes results.json, acc_matrix.csv and two PNG plots under --workdir.
"""

import time

_START = time.perf_counter()

if __name__ == "__main__":  # first thing: Ctrl-C / SIGTERM during the imports exit at once
  from experiments import signals
  signals.install()

# pylint: disable=wrong-import-position
from absl import app  # noqa: E402

from experiments import cli  # noqa: E402

cli.define_flags("split_mnist")


def main(argv):
  cli.run_main("split_mnist", argv, _START)


if __name__ == "__main__":
  app.run(cli.main_and_exit(main), flags_parser=cli.parse_flags)
