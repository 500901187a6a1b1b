"""The benchmarks by name: what each task sequence is and how it is built from a dataset.

One registry (as big_vision dispatches by name from its config): the command lines, the sweeps
and the reproduction all look a benchmark up here.

* ``split_mnist``: the classes of a dataset (default MNIST) in consecutive groups of
  ``classes_per_task`` (default 2): {0,1}, {2,3}, ...; with ``shuffle_classes``, groups of a
  random order of the classes drawn from the seed (van de Ven's Split MNIST).
* ``split_cifar``: the same on CIFAR (default CIFAR-10: 5 tasks × 2 classes; CIFAR-100: 10 × 10,
  or 20 × 5 with ``classes_per_task=5``), inputs normalised per channel.
* ``permuted_mnist``: every task is the whole dataset under its own fixed permutation of the
  H·W·C input values (task 1: the identity, unless ``permute_first``; ``pad``: the images are
  zero-padded first and the padded pixels permuted, van de Ven & Tolias' 32×32 with pad=2). The
  permutations follow the seed: the command lines, the sweeps and ``experiments.reproduce``
  build each seed's own tasks (``data_follows_seed``; the reproduction's van de Ven & Tolias
  rows with pad=2 and permute_first, ``paper_tables.Setup.build_options``).

Any TFDS image-classification dataset fits any of them (``dataset``): any H×W×C, any number of
classes.

    >>> from experiments import task_sequences
    >>> b = task_sequences.get("split_mnist")
    >>> b.title, b.dataset, b.tasks_for(10), b.default_scenario
    ('Split MNIST', 'mnist', (5, 5), 'task')
    >>> cifar = task_sequences.get("split_cifar")
    >>> cifar.tasks_for(100), cifar.tasks_for(100, 5)
    ((10, 10), (20, 20))
    >>> sorted(task_sequences.BENCHMARKS)
    ['permuted_mnist', 'split_cifar', 'split_mnist']
"""

from __future__ import annotations

from typing import Any
from typing import Callable
from typing import NamedTuple

import jax

from ewc_jax import errors
from experiments import protocols

# (dataset, scenario, num_tasks, max_examples, seed, classes_per_task) -> protocols.Tasks
Builder = Callable[..., Any]

# Class counts of datasets commonly used, to check a setting before any data is loaded (others
# are checked once the dataset is loaded, still before anything is trained or written).
KNOWN_CLASSES = {"mnist": 10, "fashion_mnist": 10, "kmnist": 10, "emnist/digits": 10,
                 "cifar10": 10, "cifar100": 100, "svhn_cropped": 10}


class Benchmark(NamedTuple):
  """A task sequence.

  Attributes:
    name: registry key (``"split_mnist"``); also the default workdir ``runs/<name>``.
    title: for tables and plots (``"Split MNIST"``).
    dataset: the TFDS dataset when none is given.
    default_scenario: the scenario when none is given.
    build: ``(dataset, scenario, num_tasks, max_examples, seed, classes_per_task) -> Tasks``.
    split: tasks are groups of classes (True) or the whole dataset each (False: permuted).
    default_tasks: the number of tasks when none is given (split: every group of classes).
    data_follows_seed: the tasks' data depend on the seed (Permuted MNIST's permutations), so
      a sweep trains each seed on its own data.
    input_norm: the input scaling when none is given (:mod:`experiments.input_norm`).
    classes_per_task: split benchmarks: the classes per task when none is given (None: 2 for
      a 10-class dataset, else 10).
  """
  name: str
  title: str
  dataset: str
  default_scenario: str
  build: Builder
  split: bool = True
  default_tasks: int | None = None
  data_follows_seed: bool = False
  input_norm: str = "none"
  classes_per_task: int | None = None

  def classes_per_task_for(self, num_classes: int, classes_per_task: int | None = None) -> int:
    """The classes of each task of a split benchmark on a ``num_classes`` dataset."""
    if classes_per_task is not None:
      return classes_per_task
    if self.classes_per_task is not None:
      return self.classes_per_task
    return 2 if num_classes <= 10 else 10

  def tasks_for(self, num_classes: int,
                classes_per_task: int | None = None) -> tuple[int, int | None]:
    """``(default number of tasks, most tasks allowed (None: any))`` on a ``num_classes``
    dataset."""
    if not self.split:
      return self.default_tasks, None
    per = self.classes_per_task_for(num_classes, classes_per_task)
    if isinstance(per, bool) or not isinstance(per, int) or not 1 <= per <= num_classes:
      raise errors.SettingError.invalid("classes_per_task", per,
                                        f"an integer in 1..{num_classes}")
    most = num_classes // per
    return (most if self.default_tasks is None else min(self.default_tasks, most)), most


def class_order(num_classes: int, seed: int, shuffle: bool) -> list[int]:
  """The classes in the order they are grouped into tasks: ``0..num_classes-1``, or a
  permutation drawn from ``seed`` (its own key, folded from the seed, so the order does not move
  with any other random choice of the run).

    >>> class_order(4, 0, False)
    [0, 1, 2, 3]
    >>> sorted(class_order(10, 3, True)) == list(range(10))
    True
  """
  if not shuffle:
    return list(range(num_classes))
  key = jax.random.fold_in(jax.random.key(seed), 0xC1A55)
  return [int(c) for c in jax.random.permutation(key, num_classes)]


def _split(ds, scenario: str, num_tasks: int, max_examples: int | None, seed: int,
           classes_per_task: int | None = None, *, bench_name: str = "split_mnist",
           shuffle_classes: bool = False):
  num_classes = ds.num_classes
  per = BENCHMARKS[bench_name].classes_per_task_for(num_classes, classes_per_task)
  order = class_order(num_classes, seed, shuffle_classes)
  groups = [tuple(order[per * t:per * (t + 1)]) for t in range(num_tasks)]
  return protocols.split(ds, scenario, num_tasks, max_examples, groups)


def _split_cifar(*args, **kwargs):
  return _split(*args, **kwargs, bench_name="split_cifar")


def _permuted(ds, scenario: str, num_tasks: int, max_examples: int | None, seed: int,
              classes_per_task: int | None = None, *, pad: int = 0,
              permute_first: bool = False):
  del classes_per_task  # every task has every class
  key = jax.random.fold_in(jax.random.key(seed), 0x5EED)  # the permutations follow the seed
  return protocols.permuted(ds, scenario, num_tasks, max_examples, key, pad=pad,
                            permute_first=permute_first)


BENCHMARKS: dict[str, Benchmark] = {
    "split_mnist": Benchmark("split_mnist", "Split MNIST", "mnist", "task", _split,
                             classes_per_task=2),
    "split_cifar": Benchmark("split_cifar", "Split CIFAR", "cifar10", "task", _split_cifar,
                             input_norm="per_channel"),
    "permuted_mnist": Benchmark("permuted_mnist", "Permuted MNIST", "mnist", "domain",
                                _permuted, split=False, default_tasks=10,
                                data_follows_seed=True),
}


def get(name: str) -> Benchmark:
  """The benchmark called ``name``; :class:`ewc_jax.errors.SettingError` naming ``benchmark``
  otherwise."""
  if name not in BENCHMARKS:
    raise errors.SettingError.invalid("benchmark", name, "one of " + ", ".join(BENCHMARKS))
  return BENCHMARKS[name]
