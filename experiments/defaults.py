"""Default protocol of each benchmark, scenario and backbone, chosen by measurement (docs/cli.md:
"Defaults and how they were chosen"; the sweeps behind them are in ``docs/defaults/``).

A flag the user does not set takes its value from :data:`BACKBONE_DEFAULTS` for the benchmark,
scenario and backbone of the run, then :data:`DEFAULTS` for the benchmark and scenario, else
the :class:`ewc_jax.continual.Config` default. λ was chosen for the EWC family (``ewc``,
``ewc_merged``, ``online_ewc``) by a vmapped λ sweep ranked on the validation split
(``--validation_fraction``), never on the test set.

    >>> from experiments import defaults
    >>> defaults.for_run("split_mnist", "task")["lam"]               # the MLP's
    10000.0
    >>> defaults.for_run("split_mnist", "task", "mlp") == defaults.for_run("split_mnist", "task")
    True
"""

from __future__ import annotations

# Fields of ewc_jax.continual.Config (plus the benchmark's scenario) by (benchmark, scenario).
DEFAULTS: dict[tuple[str, str], dict] = {
    # Split MNIST: MLP 784-400-400, Adam lr 1e-3 restarted at each task, 2 epochs, batch 128,
    # empirical Fisher (the peers' protocol); λ from docs/defaults/split_mnist_<scenario>*.json.
    ("split_mnist", "task"): {"lam": 1e4},
    ("split_mnist", "domain"): {"lam": 1e7},
    ("split_mnist", "class"): {"lam": 1e6},
    # Permuted MNIST: the same network and length, Adam kept across tasks (validation AA 93.1 vs
    # 90.0 restarted, seed 0: docs/defaults/permuted_mnist_domain_optimizer_*.json).
    ("permuted_mnist", "domain"): {"lam": 30.0, "reset_optimizer": False},
    ("permuted_mnist", "task"): {"lam": 3.0, "reset_optimizer": False},
    ("permuted_mnist", "class"): {"lam": 10.0, "reset_optimizer": False},
    # Split CIFAR: the reduced ResNet-18 (BatchNorm) with crop + flip augmentation and 50 epochs
    # per task, the protocol of Mammoth's seq-cifar10; NOT measured here (no CIFAR on this
    # machine, and no GPU): λ, lr and the optimizer keep the Split MNIST values.
    **{("split_cifar", s): {"backbone": "resnet18", "augment": "crop_flip", "epochs": 50}
       for s in ("task", "domain", "class")},
}

# Fields of a backbone other than the benchmark's own, by (benchmark, scenario, backbone): they
# replace the DEFAULTS entry's (chosen for the MLP; for the backbone named there, e.g. Split
# CIFAR's resnet18). A backbone not listed keeps the DEFAULTS entry.
BACKBONE_DEFAULTS: dict[tuple[str, str, str], dict] = {
    # flax/examples' CNN, Split MNIST task-IL: λ from 100 … 1e6, seed 0, validation AA 99.63
    # (λ = 1e3: 99.61, 1e4: 99.55; the lowest λ of the grid: docs/defaults/split_mnist_task_cnn.json).
    ("split_mnist", "task", "cnn"): {"lam": 100.0},
    # Domain-IL: λ from 1e3 … 1e8, seed 0, validation AA 83.06 (1e6: 81.21, 1e4: 79.22, 1e7:
    # 76.84; docs/defaults/split_mnist_domain_cnn.json); the MLP's 1e7 ranks fourth.
    ("split_mnist", "domain", "cnn"): {"lam": 1e5},
    # Class-IL: λ from 1e4 … 1e8, seed 0: every λ at or below chance over the 5 tasks (EWC's
    # known class-IL failure), validation AA 19.93 at 1e4 (the grid's lowest; 1e5: 19.75, 1e6:
    # 18.41; docs/defaults/split_mnist_class_cnn.json).
    ("split_mnist", "class", "cnn"): {"lam": 1e4},
}

# The settings whose default depends on the benchmark and scenario (the flags' help says so).
PER_BENCHMARK = frozenset({"scenario"} | {name for fields in DEFAULTS.values() for name in fields}
                          | {name for fields in BACKBONE_DEFAULTS.values() for name in fields})


def for_run(benchmark: str, scenario: str, backbone: str | None = None) -> dict:
  """The default fields of a run of ``benchmark`` in ``scenario`` with ``backbone`` (None: the
  benchmark's own, e.g. ``mlp``); empty when not listed."""
  fields = dict(DEFAULTS.get((benchmark, scenario), {}))
  name = backbone or fields.get("backbone", "mlp")
  fields.update(BACKBONE_DEFAULTS.get((benchmark, scenario, name), {}))
  return fields
