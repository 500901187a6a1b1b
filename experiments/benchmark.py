"""The benchmarks by name: what each task sequence is and how it is built from a dataset.

One registry (as big_vision dispatches by name from its config): the command lines, the sweeps
and the reproduction all look a benchmark up here.

    >>> from experiments import benchmark
    >>> b = benchmark.get("split_mnist")
    >>> b.title, b.default_tasks, b.max_tasks, b.default_scenario
    ('Split MNIST', 5, 5, 'task')
    >>> sorted(benchmark.BENCHMARKS)
    ['permuted_mnist', 'split_mnist']
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from ewc_jax import errors

# (dataset, scenario, num_tasks, max_examples, seed) -> experiments.protocols.Tasks
Builder = Callable[[Any, str, int, "int | None", int], Any]


class Benchmark(NamedTuple):
  """A task sequence.

  Attributes:
    name: registry key (``"split_mnist"``); also the default workdir ``runs/<name>``.
    title: for tables and plots (``"Split MNIST"``).
    max_tasks: the most tasks the dataset allows (``None``: any number).
    default_tasks: the number of tasks when none is given.
    default_scenario: the scenario when none is given.
    build: ``(dataset, scenario, num_tasks, max_examples, seed) -> protocols.Tasks``.
    data_follows_seed: the tasks' data depend on the seed (Permuted MNIST's permutations), so
      a sweep trains each seed on its own data.
  """
  name: str
  title: str
  max_tasks: int | None
  default_tasks: int
  default_scenario: str
  build: Builder
  data_follows_seed: bool = False


def _split(ds, scenario: str, num_tasks: int, max_examples: int | None, seed: int):
  del seed  # the classes of each task are fixed
  from experiments import protocols  # pylint: disable=import-outside-toplevel
  return protocols.split(ds, scenario, num_tasks, max_examples)


def _permuted(ds, scenario: str, num_tasks: int, max_examples: int | None, seed: int):
  import jax  # pylint: disable=import-outside-toplevel
  from experiments import protocols  # pylint: disable=import-outside-toplevel
  key = jax.random.fold_in(jax.random.key(seed), 0x5EED)  # the permutations follow the seed
  return protocols.permuted(ds, scenario, num_tasks, max_examples, key)


BENCHMARKS: dict[str, Benchmark] = {
    "split_mnist": Benchmark("split_mnist", "Split MNIST", max_tasks=5, default_tasks=5,
                             default_scenario="task", build=_split),
    "permuted_mnist": Benchmark("permuted_mnist", "Permuted MNIST", max_tasks=None,
                                default_tasks=10, default_scenario="domain", build=_permuted,
                                data_follows_seed=True),
}


def get(name: str) -> Benchmark:
  """The benchmark called ``name``; :class:`ewc_jax.errors.SettingError` naming ``benchmark``
  otherwise."""
  if name not in BENCHMARKS:
    raise errors.SettingError.invalid("benchmark", name, "one of " + ", ".join(BENCHMARKS))
  return BENCHMARKS[name]
