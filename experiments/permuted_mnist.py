r"""Permuted MNIST: T tasks (default 10), each MNIST under its own fixed pixel permutation.

    python -m experiments.permuted_mnist --algo=ewc --scenario=domain
    python -m experiments.permuted_mnist --num_tasks=5 --algo=online_ewc --gamma=0.9

Task 1 is the identity permutation; the permutations come from a PRNG key derived from --seed.
Scenarios: domain (default here: one shared 10-way head), task (a 10-way head per task), class
(one 10·T-way head, labels offset by 10·t). Same flags and outputs as experiments.split_mnist.
"""

import time

_START = time.perf_counter()

if __name__ == "__main__":  # first thing: Ctrl-C / SIGTERM during the imports exit at once
  from experiments import signals
  signals.install()

# pylint: disable=wrong-import-position
from absl import app  # noqa: E402

from experiments import cli  # noqa: E402

cli.define_flags("permuted_mnist")


def main(argv):
  cli.run_main("permuted_mnist", argv, _START)


if __name__ == "__main__":
  app.run(cli.main_and_exit(main), flags_parser=cli.parse_flags)
