r"""Split CIFAR: CIFAR-10 in 5 tasks of 2 classes; CIFAR-100 in 10 tasks of 10 (or 20 of 5).

    python -m experiments.split_cifar --algo=ewc
    python -m experiments.split_cifar --dataset=cifar100 --classes_per_task=5 --seeds=0,1,2

Inputs are normalised per channel with the training split's statistics. The datasets come
through TFDS's normal download (``cifar10``, ``cifar100``) on a machine with internet, or from a
prepared ``--data_dir``. Same flags and outputs as experiments.split_mnist.
"""

import time

_START = time.perf_counter()

if __name__ == "__main__":  # first thing: Ctrl-C / SIGTERM during the imports exit at once
  from experiments import signals
  signals.install()

# pylint: disable=wrong-import-position
from absl import app  # noqa: E402

from experiments import cli  # noqa: E402

cli.define_flags("split_cifar")


def main(argv):
  cli.run_main("split_cifar", argv, _START)


if __name__ == "__main__":
  app.run(cli.main_and_exit(main), flags_parser=cli.parse_flags)
