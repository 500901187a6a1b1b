"""The two papers' tables: their setups, published numbers, citations and λ translations.

Hsu et al. 2018 (Split MNIST) and van de Ven & Tolias 2019 (Split and Permuted MNIST), each a
:class:`Setup` in :data:`PROTOCOLS` (looked up with :func:`get_setup`): what the paper trained
(widths, learning rate, batch, tasks, training length, Fisher, inputs, initialisation), what it
reported (mean ± std or SEM per algorithm and scenario) and its λ, γ with the translation onto
our penalty (λ/2) Σ F (θ − θ*)², F the mean per-example Fisher (see docs/reproducing.md).
:func:`hyper_for` and :func:`length_for` give a row's λ, γ and training length in our terms.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from ewc_jax import errors
from experiments import task_sequences as benchmark_lib

SCENARIOS = ("task", "domain", "class")
SCENARIO_TITLES = {"task": "Task-IL", "domain": "Domain-IL", "class": "Class-IL"}
ALGO_TITLES = {"finetune": "finetune (none)", "joint": "joint (offline)", "ewc": "EWC",
               "online_ewc": "online EWC", "l2": "L2"}
BENCHMARKS = {"split": benchmark_lib.get("split_mnist"),
              "permuted": benchmark_lib.get("permuted_mnist")}


# ---------------------------------------------------------------------------------------------
# The protocols: what the papers did, what they reported, and how their λ maps onto ours.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setup:
  """One benchmark of one paper.

  ``published[algo][scenario] = (mean, err)`` in percent; ``err`` is a std (``err_kind="std"``)
  or a standard error of the mean (``"sem"``) over ``runs`` runs. ``lam[algo][scenario] =
  (their λ, their γ)``; ``translate(algo, lam, gamma) -> (our lam, our gamma)``.
  Training length per task as the paper counts it: ``iterations`` (``Config.steps_per_task``)
  or ``epochs``. Joint training trains task t on the union of tasks 1..t, for the same
  ``iterations`` (van de Ven & Tolias' offline baseline: ``ConcatDataset(train_datasets[:task])``
  for ``iters`` iterations) or ``epochs`` of that union. ``joint_rule`` only matters when an
  ``--epochs`` override replaces the paper's iterations: ``"iterations"`` gives joint the
  epochs that make, on the final set of all tasks, the iterations of one task (see
  :func:`epochs_for`). ``reset_optimizer``: whether the paper restarts Adam at every task
  (neither does: Hsu's ``reset_optimizer = False``, van de Ven's ``optim_type = "adam"``).
  Every parameter shared by several tasks is penalised (``Config.consolidate`` default).

  Inputs of a permuted benchmark (:attr:`build_options`, the builder's own options, as the
  command lines' ``--pad`` / ``--permute_first``): ``pad`` zero-pads every image by that many
  pixels before its pixels are permuted, ``permute_first`` permutes task 1 too. ``init``: the
  parameter initialisation (``Config.init``; ``"pytorch"``: uniform ±1/√fan_in, as in a
  PyTorch paper's code, so the first layer's fan-in is the number of inputs after padding).
  """
  protocol: str
  benchmark: str
  short: str                       # "Hsu et al. 2018"
  citation: str
  hidden: tuple[int, ...]
  lr: float
  batch_size: int
  num_tasks: int
  fisher: str
  published: dict
  err_kind: str
  runs: int
  lam: dict
  translate: Callable[[str, float, float], tuple[float, float]]
  algos: tuple[str, ...]
  epochs: int | None = None
  iterations: int | None = None
  joint_rule: str = "epochs"
  reset_optimizer: bool = False
  preprocess: str = "scale"        # "scale": pixels / 255; "hsu": pad to 32x32, normalise
  source: str = ""                 # where the hyperparameters come from
  pad: int = 0                     # permuted: zero-pad each image by N pixels, then permute
  permute_first: bool = False      # permuted: task 1 permuted too (else the identity)
  init: str = "flax"               # Config.init of the runs

  @property
  def build_options(self) -> dict:
    """The benchmark builder's extra keyword arguments (as ``ExperimentConfig.build_options``
    of the command lines): ``pad`` and ``permute_first`` for a permuted benchmark, none for a
    split one."""
    if BENCHMARKS[self.benchmark].split:
      return {}
    return {"pad": self.pad, "permute_first": self.permute_first}


def _hsu_translate(algo: str, lam: float, gamma: float) -> tuple[float, float]:
  """Hsu et al.: loss + λ Σ F (θ − θ*)² (no ½), F the mean per-example Fisher with the argmax
  label; online EWC sums the Fisher matrices without decay (γ = 1); L2 has F = 1."""
  del algo
  return 2.0 * lam, gamma


def _vandeven_translate(algo: str, lam: float, gamma: float) -> tuple[float, float]:
  """van de Ven & Tolias: loss + λ · ½ Σ F (θ − θ*)², F the mean per-example Fisher with the
  argmax label (as ours). Online EWC keeps F̃ ← γ F̃ + F_t (as ours) but multiplies F̃ by γ
  *again* inside the loss, so our λ = γ · theirs."""
  if algo == "online_ewc":
    return gamma * lam, gamma
  return lam, gamma


def _table(rows: dict) -> dict:
  """``{algo: (task, domain, class) cells}`` as ``{algo: {scenario: cell}}``."""
  return {algo: dict(zip(SCENARIOS, cells)) for algo, cells in rows.items()}


HSU_SPLIT = Setup(
    protocol="hsu", benchmark="split", short="Hsu et al. 2018",
    citation="Hsu, Liu, Ramasamy & Kira 2018, \"Re-evaluating continual learning scenarios: a "
             "categorization and case for strong baselines\" (NeurIPS CL workshop), Table 2",
    hidden=(400, 400), lr=1e-3, batch_size=128, num_tasks=5, epochs=4, fisher="predicted",
    published=_table({
        "ewc": ((97.70, 0.81), (58.85, 2.59), (19.80, 0.05)),
        "online_ewc": ((98.04, 1.10), (57.33, 1.44), (19.77, 0.04)),
        "finetune": ((93.46, 2.01), (55.16, 1.38), (19.71, 0.08)),
        "l2": ((98.18, 0.96), (66.00, 3.73), (22.52, 1.08)),
        "joint": ((99.52, 0.16), (98.59, 0.15), (97.53, 0.30)),
    }),
    err_kind="std", runs=10,
    lam=_table({
        "ewc": ((100.0, 1.0), (100.0, 1.0), (600.0, 1.0)),
        "online_ewc": ((400.0, 1.0), (700.0, 1.0), (100.0, 1.0)),
        "l2": ((0.01, 1.0), (0.5, 1.0), (100.0, 1.0)),
    }),
    translate=_hsu_translate,
    algos=("finetune", "joint", "ewc", "online_ewc", "l2"),
    joint_rule="epochs", preprocess="hsu",
    source="GT-RIPL/Continual-Learning-Benchmark: scripts/split_MNIST_incremental_{task,domain,"
           "class}.sh (--reg_coef), agents/regularization.py, agents/customization.py "
           "(EWC_mnist, EWC_online_mnist), dataloaders/base.py")

_VDV_CITATION = ("van de Ven & Tolias 2019, \"Three scenarios for continual learning\" "
                 "(arXiv:1904.07734), Tables 4 and 5")
_VDV_SOURCE = ("GMvandeVen/continual-learning: param_values.py at commit f0b1461 (the version "
               "with --o-lambda and --gamma), continual_learner.py (estimate_fisher, ewc_loss)")

VDV_SPLIT = Setup(
    protocol="vandeven", benchmark="split", short="van de Ven & Tolias 2019",
    citation=_VDV_CITATION,
    hidden=(400, 400), lr=1e-3, batch_size=128, num_tasks=5, iterations=2000, fisher="predicted",
    published=_table({
        "ewc": ((98.64, 0.22), (63.95, 1.90), (20.01, 0.06)),
        "online_ewc": ((99.12, 0.11), (64.32, 1.90), (19.96, 0.07)),
        "finetune": ((87.19, 0.94), (59.21, 2.04), (19.90, 0.02)),
        "joint": ((99.66, 0.02), (98.42, 0.06), (97.94, 0.03)),
    }),
    err_kind="sem", runs=20,
    lam=_table({
        "ewc": ((1e7, 1.0), (1e6, 1.0), (1e8, 1.0)),
        "online_ewc": ((1e8, 0.8), (1e8, 0.7), (1e9, 0.8)),
    }),
    translate=_vandeven_translate, algos=("finetune", "joint", "ewc", "online_ewc"),
    joint_rule="iterations", source=_VDV_SOURCE)

VDV_PERMUTED = Setup(
    protocol="vandeven", benchmark="permuted", short="van de Ven & Tolias 2019",
    citation=_VDV_CITATION,
    hidden=(1000, 1000), lr=1e-4, batch_size=128, num_tasks=10, iterations=5000,
    fisher="predicted",
    published=_table({
        "ewc": ((94.74, 0.05), (94.31, 0.11), (25.04, 0.50)),
        "online_ewc": ((95.96, 0.06), (94.42, 0.13), (33.88, 0.49)),
        "finetune": ((81.79, 0.48), (78.51, 0.24), (17.26, 0.19)),
        "joint": ((97.68, 0.01), (97.59, 0.01), (97.59, 0.02)),
    }),
    err_kind="sem", runs=20,
    lam=_table({
        "ewc": ((500.0, 1.0), (500.0, 1.0), (1.0, 1.0)),
        "online_ewc": ((500.0, 0.8), (1000.0, 0.9), (5.0, 1.0)),
    }),
    translate=_vandeven_translate, algos=("finetune", "joint", "ewc", "online_ewc"),
    joint_rule="iterations", source=_VDV_SOURCE,
    # Their inputs: 28x28 zero-padded to 32x32 (transforms.Pad(2)), each task a permutation of
    # the 1024 padded pixels, every task permuted (their code leaves task 1 unpermuted only for
    # seed 0, and their compare scripts start at seed 1), PyTorch's nn.Linear initialisation
    # (first layer fan-in 1024).
    pad=2, permute_first=True, init="pytorch")

PROTOCOLS = {("hsu", "split"): HSU_SPLIT, ("vandeven", "split"): VDV_SPLIT,
             ("vandeven", "permuted"): VDV_PERMUTED}


def get_setup(protocol: str, benchmark: str) -> Setup:
  """The :class:`Setup` of ``protocol`` on ``benchmark``; a
  :class:`ewc_jax.errors.SettingError` naming both settings when that paper has no such table."""
  if (protocol, benchmark) not in PROTOCOLS:
    have = ", ".join(f"{p}/{b}" for p, b in PROTOCOLS)
    raise errors.SettingError(lambda n: (
        f"{n('protocol', protocol)} {n('benchmark', benchmark)} is invalid: expected one of "
        f"{have}."))
  return PROTOCOLS[(protocol, benchmark)]


# ---------------------------------------------------------------------------------------------
# The papers' training length and λ in our terms.
# ---------------------------------------------------------------------------------------------

def epochs_for(setup: Setup, algo: str, counts: Sequence[int], override: int | None) -> int:
  """Epochs per task: the paper's, or its iterations per task converted with the mean task size;
  for joint training (cumulative sets) per ``setup.joint_rule``."""
  mean_n = sum(counts) / len(counts)
  if override is not None:
    epochs = override
  elif setup.iterations is not None:
    epochs = max(1, round(setup.iterations * setup.batch_size / mean_n))
  else:
    epochs = setup.epochs
  if algo == "joint" and setup.joint_rule == "iterations":
    epochs = max(1, round(epochs * mean_n / sum(counts)))
  return int(epochs)


def length_for(setup: Setup, algo: str, counts: Sequence[int],
               override: int | None) -> tuple[int | None, int | None]:
  """``(epochs, steps_per_task)`` of a run (exactly one is set): the paper's iterations per
  task (joint too: that many iterations on the union of the tasks so far), else the paper's
  epochs; an ``--epochs`` override gives epochs (:func:`epochs_for`, a reduced variant)."""
  if override is None and setup.iterations is not None:
    return None, int(setup.iterations)
  return epochs_for(setup, algo, counts, override), None


def hyper_for(setup: Setup, algo: str, scenario: str) -> tuple[float | None, float | None,
                                                               float, float]:
  """``(their λ, their γ, our lam, our gamma)``; λ None for unregularised algorithms."""
  if algo in ("finetune", "joint"):
    return None, None, 1.0, 1.0
  lam, gamma = setup.lam[algo][scenario]
  ours = setup.translate(algo, lam, gamma)
  return lam, gamma, float(ours[0]), float(ours[1])
