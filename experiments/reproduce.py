r"""Reproduce published EWC tables: Hsu et al. 2018 and van de Ven & Tolias 2019.

    python -m experiments.reproduce --protocol=hsu                        # Split MNIST, 3 scenarios
    python -m experiments.reproduce --protocol=vandeven --benchmark=split
    python -m experiments.reproduce --protocol=vandeven --benchmark=permuted    # full: very long
    python -m experiments.reproduce --protocol=vandeven --benchmark=permuted \
        --hidden=400,400 --max_examples=10000 --epochs=6                       # a reduced run

Each (scenario, algorithm) is one ``ewc_jax.sweep.run`` over the seeds (one vmapped program),
on the tasks of the benchmark registry (``experiments.benchmark``) and the network of
``heads.make_network``, with the paper's hyperparameters translated to our conventions
(:data:`PROTOCOLS`; λ: our penalty is (λ/2) Σ F (θ − θ*)² with F the mean per-example Fisher,
see README) and the papers' protocol
controls: training length per task as the paper counts it (van de Ven & Tolias: iterations,
``Config.steps_per_task``; Hsu et al.: epochs), Adam kept across tasks (neither paper resets
it), every parameter shared by several tasks penalised (the shared head too). Results
accumulate in a JSON store (``--json``, default ``--out`` with ``.json``; re-read before every
write) keyed by protocol / benchmark / variant / scenario / algorithm, and the tables of
every stored result are rewritten between two markers in ``--out`` (text outside the markers
is kept). Any departure from the protocol (``--epochs``, ``--hidden``, ``--max_examples``,
``--num_tasks``, or a λ check ``--lam_factor``) makes a *reduced* variant named by its
departures, stored and shown apart from the full protocol.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

_START = time.perf_counter()

# pylint: disable=wrong-import-position
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from experiments import benchmark as benchmark_lib  # noqa: E402
from experiments import compile_cache  # noqa: E402
from experiments import environment as environment_lib  # noqa: E402
from experiments import files  # noqa: E402
from experiments import progress as progress_lib  # noqa: E402

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
    joint_rule="iterations", source=_VDV_SOURCE)

PROTOCOLS = {("hsu", "split"): HSU_SPLIT, ("vandeven", "split"): VDV_SPLIT,
             ("vandeven", "permuted"): VDV_PERMUTED}


def get_setup(protocol: str, benchmark: str) -> Setup:
  if (protocol, benchmark) not in PROTOCOLS:
    have = ", ".join(f"{p}/{b}" for p, b in PROTOCOLS)
    raise ValueError(f"--protocol={protocol!r} --benchmark={benchmark!r} is invalid: expected "
                     f"one of {have}.")
  return PROTOCOLS[(protocol, benchmark)]


def hsu_preprocess(x):
  """Hsu et al.'s MNIST input: zero-pad 28x28 to 32x32, then (x/255 − 0.1) / 0.2752."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x = x.reshape((x.shape[0], 28, 28)).astype(jnp.float32) / 255.0
  x = jnp.pad(x, ((0, 0), (2, 2), (2, 2)))
  return ((x - 0.1) / 0.2752).reshape((x.shape[0], 32 * 32))


def preprocess_fn(setup: Setup):
  from ewc_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  return hsu_preprocess if setup.preprocess == "hsu" else train_lib.scale_pixels


# ---------------------------------------------------------------------------------------------
# Running one (scenario, algorithm) over the seeds.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Overrides:
  """Departures from the published protocol (each one makes the result *reduced*)."""
  epochs: int | None = None
  hidden: tuple[int, ...] | None = None
  max_examples: int | None = None
  num_tasks: int | None = None
  lam_factor: float | None = None  # a λ check: our translated λ times this factor

  def describe(self) -> list[str]:
    out = []
    if self.lam_factor is not None:
      out.append(f"λ × {self.lam_factor:g} (a λ check on the test set, not the paper's λ)")
    if self.epochs is not None:
      out.append(f"epochs per task = {self.epochs}")
    if self.hidden is not None:
      out.append(f"hidden = {'-'.join(map(str, self.hidden))}")
    if self.max_examples is not None:
      out.append(f"first {self.max_examples} train (and test) examples per task")
    if self.num_tasks is not None:
      out.append(f"{self.num_tasks} tasks")
    return out

  @property
  def reduced(self) -> bool:
    return bool(self.describe())


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


def iterations(cfg, count: int) -> int:
  """Optimizer steps on a training set of ``count`` examples under ``cfg``'s schedule."""
  epochs, steps, last = cfg.schedule(count)
  return (epochs - 1) * steps + last


def hyper_for(setup: Setup, algo: str, scenario: str) -> tuple[float | None, float | None,
                                                               float, float]:
  """``(their λ, their γ, our lam, our gamma)``; λ None for unregularised algorithms."""
  if algo in ("finetune", "joint"):
    return None, None, 1.0, 1.0
  lam, gamma = setup.lam[algo][scenario]
  ours = setup.translate(algo, lam, gamma)
  return lam, gamma, float(ours[0]), float(ours[1])


def _scaled(lam: float, factor: float | None) -> float:
  return lam if factor is None else lam * factor


def variant(overrides: Overrides) -> str:
  """``"full"``, or ``"reduced[...]"`` naming the departures (each variant is stored apart)."""
  return f"reduced[{'; '.join(overrides.describe())}]" if overrides.reduced else "full"


def record_key(setup: Setup, overrides: Overrides, scenario: str, algo: str) -> str:
  return f"{setup.protocol}/{setup.benchmark}/{variant(overrides)}/{scenario}/{algo}"


def run_one(setup: Setup, algo: str, scenario: str, seeds: Sequence[int], ds,
            overrides: Overrides = Overrides(), progress=None, log=print, tag: str = "",
            checkpointer=None) -> dict:
  """Trains ``algo`` in ``scenario`` for every seed (one vmapped sweep); returns the record.

  ``checkpointer``: an ``ewc_jax.checkpoint.SweepCheckpointer`` (the sweep's state is saved
  after each task and resumed from when its folder holds it), or None."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ewc_jax import continual, heads, sweep  # pylint: disable=import-outside-toplevel
  from experiments import tasks  # pylint: disable=import-outside-toplevel

  if algo not in setup.published:
    raise ValueError(f"--algos={algo!r} is invalid for --protocol={setup.protocol} "
                     f"--benchmark={setup.benchmark}: the paper reports "
                     f"{', '.join(setup.algos)}.")
  t0 = time.perf_counter()
  lam_paper, gamma_paper, lam, gamma = hyper_for(setup, algo, scenario)
  if lam_paper is not None:
    lam = _scaled(lam, overrides.lam_factor)
  num_tasks = overrides.num_tasks or setup.num_tasks
  hidden = overrides.hidden or setup.hidden
  base = continual.Config(algo=algo, scenario=scenario, lam=lam, gamma=gamma,
                          fisher=setup.fisher, batch_size=setup.batch_size, lr=setup.lr,
                          hidden=tuple(hidden), seed=int(seeds[0]),
                          reset_optimizer=setup.reset_optimizer)
  bench = BENCHMARKS[setup.benchmark]
  built = bench.build(ds, base.scenario, num_tasks, overrides.max_examples, base.seed)
  counts = [int(c) for c in np.asarray(built.train.counts)]
  epochs, steps_per_task = length_for(setup, algo, counts, overrides.epochs)
  base = dataclasses.replace(base, epochs=epochs, steps_per_task=steps_per_task)
  base.validate()
  length = (f"{epochs} epochs/task" if epochs is not None else
            f"{steps_per_task} iterations/task")
  log(f"{tag}{setup.protocol}/{setup.benchmark} {SCENARIO_TITLES[scenario]} {algo}: "
      + (f"λ paper {lam_paper:g} -> ours {lam:g}, γ {gamma:g}, " if lam_paper is not None else "")
      + f"{length}, Adam {'reset' if base.reset_optimizer else 'kept'}, consolidated "
      f"{base.consolidated}, seeds {','.join(map(str, seeds))}")
  train, test = tasks.to_device(built.train), tasks.to_device(built.test)
  net = heads.make_network(scenario, built.class_groups, base.hidden)
  result = sweep.run(sweep.grid(base, seed=[int(s) for s in seeds]), net, train, test,
                     preprocess=preprocess_fn(setup), progress=progress,
                     checkpointer=checkpointer)
  acc = np.asarray(result.acc_matrix, np.float64)           # [K, T, T]
  final = 100.0 * acc[:, -1, :].mean(-1)                     # average accuracy per seed (%)
  mean, err = setup.published[algo][scenario]
  # The training set of each task: joint trains task t on the union of tasks 1..t.
  sizes = list(itertools.accumulate(counts)) if algo == "joint" else counts
  record = {
      "protocol": setup.protocol, "benchmark": setup.benchmark, "scenario": scenario,
      "algo": algo, "seeds": [int(s) for s in seeds],
      "reduced": overrides.reduced, "variant": variant(overrides),
      "deviations": overrides.describe(),
      "lam_paper": lam_paper, "gamma_paper": gamma_paper, "lam": lam, "gamma": gamma,
      "epochs": epochs, "steps_per_task": steps_per_task,
      "reset_optimizer": bool(base.reset_optimizer), "consolidated": base.consolidated,
      "task_sizes": counts, "num_tasks": num_tasks,
      "hidden": list(base.hidden), "lr": base.lr, "batch_size": base.batch_size,
      "fisher": base.fisher, "max_examples": overrides.max_examples,
      "iterations_per_task": [iterations(base, n) for n in sizes],
      "average_accuracy": final.tolist(),
      "mean": float(final.mean()), "std": float(final.std()),
      "sem": float(final.std(ddof=1) / math.sqrt(len(final))) if len(final) > 1 else None,
      "published": {"mean": mean, "err": err, "err_kind": setup.err_kind, "runs": setup.runs},
      "acc_matrix": acc.tolist(),
      "bwt": [s["bwt"] for s in result.summaries],
      "timings": {k: float(v) for k, v in result.timings.items()},
      "wall_seconds": time.perf_counter() - t0,
      "config": dataclasses.asdict(base),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  log(f"  -> {record['mean']:.2f} ± {record['std']:.2f} (paper {mean:.2f} ± {err:.2f} "
      f"{setup.err_kind}), {record['wall_seconds']:.0f} s")
  return record


# ---------------------------------------------------------------------------------------------
# The store (JSON) and the markdown.
# ---------------------------------------------------------------------------------------------

BEGIN = ("<!-- BEGIN tables generated by `python -m experiments.reproduce` from the JSON store; "
         "edits inside are overwritten -->")
END = "<!-- END generated tables -->"


# A record of the runner before it followed the papers' protocol controls (no reset_optimizer
# in the record): it restarted Adam at every task, penalised the backbone only and converted
# iterations to epochs. Such records are kept as their own (reduced) variant.
EARLIER_RUNNER = ("earlier runner: Adam restarted at every task, heads not penalised, "
                  "iterations converted to epochs")


def load_store(path: Path) -> dict:
  if not path.exists():
    return {"records": {}}
  store = json.loads(path.read_text())
  records = {}
  for rec in store["records"].values():
    if "reset_optimizer" not in rec:  # the runner before the papers' protocol controls
      rec.update(reset_optimizer=True, consolidated="backbone", steps_per_task=None)
      rec["deviations"] = list(rec["deviations"]) + [EARLIER_RUNNER]
      rec["reduced"] = True
      rec["variant"] = f"reduced[{'; '.join(rec['deviations'])}]"
    if "variant" not in rec:  # records written before variants were named
      rec["variant"] = (f"reduced[{'; '.join(rec['deviations'])}]" if rec["reduced"] else "full")
    records[f"{rec['protocol']}/{rec['benchmark']}/{rec['variant']}/{rec['scenario']}/"
            f"{rec['algo']}"] = rec
  store["records"] = records
  return store


def published_std(rec: dict) -> float:
  """The paper's spread as a std: an SEM over n runs times √n."""
  pub = rec["published"]
  return pub["err"] * math.sqrt(pub["runs"]) if pub["err_kind"] == "sem" else pub["err"]


def verdict(rec: dict) -> str:
  delta = rec["mean"] - rec["published"]["mean"]
  std = published_std(rec)
  if abs(delta) <= std:
    return "within 1 std"
  return f"{'above' if delta > 0 else 'below'} by {abs(delta) - std:.2f} beyond 1 std"


def bracketing(finetune: dict, ewc: dict, joint: dict) -> str:
  """Whether finetune ≤ EWC ≤ joint, an inversion within the seeds' noise being a tie."""
  def le(a, b):
    if a["mean"] <= b["mean"]:
      return "≤"
    return "≈" if a["mean"] - b["mean"] <= a["std"] + b["std"] else ">"
  ops = le(finetune, ewc), le(ewc, joint)
  verdict_ = "**no**" if ">" in ops else ("yes, with a tie" if "≈" in ops else "yes")
  return (f"finetune {finetune['mean']:.2f} {ops[0]} EWC {ewc['mean']:.2f} {ops[1]} "
          f"joint {joint['mean']:.2f} — {verdict_}")


def _fmt_lam(x) -> str:
  return "–" if x is None else f"{x:g}"


def _length(rec: dict) -> str:
  steps = rec.get("steps_per_task")
  return f"{steps} it" if steps is not None else f"{rec['epochs']} ep"


def _group_header(recs: list[dict]) -> str:
  r = recs[0]
  setup = get_setup(r["protocol"], r["benchmark"])
  seeds = sorted({tuple(x["seeds"]) for x in recs})
  sizes = r["task_sizes"]
  hsu = setup.preprocess == "hsu"
  lines = [
      f"### {setup.short}, {BENCHMARKS[r['benchmark']].title}"
      + (" — **REDUCED**" if r["reduced"] else ""),
      "",
      f"Paper: {setup.citation}; hyperparameters from {setup.source}.",
      "",
      f"Ours: MLP {'-'.join(map(str, [1024 if hsu else 784] + r['hidden']))} "
      + ("(28x28 zero-padded to 32x32, then (x − 0.1) / 0.2752, as in their code) "
         if hsu else "(pixels / 255) ")
      + f"ReLU, Adam lr {r['lr']:g} ("
      + ("restarted at every task" if r["reset_optimizer"] else "kept across tasks, not reset")
      + f"), batch {r['batch_size']}, "
      f"Fisher `{r['fisher']}` (argmax label, mean over the task's examples), "
      + ("penalising every parameter shared by several tasks (the backbone, and the shared "
         "head of Domain-IL and Class-IL; Task-IL's per-task heads stay free), "
         if r["consolidated"] == "shared" else
         "penalising the backbone only (heads free), "
         if r["consolidated"] == "backbone" else f"penalising {r['consolidated']} parameters, ")
      + f"{len(sizes)} tasks of {min(sizes)}–{max(sizes)} training examples, "
      f"seeds {'; '.join(','.join(map(str, s)) for s in seeds)} (one vmapped run per row).",
  ]
  steps = {x["steps_per_task"] for x in recs}
  if steps != {None}:
    lines += ["", f"Training length: {'/'.join(str(v) for v in sorted(steps - {None}))} "
              "iterations per task, as the paper counts it (a partial last batch of an epoch is "
              "one iteration). Joint training trains task t on the union of tasks 1..t for the "
              "same number of iterations (column *per task*)."]
  elif setup.iterations is not None:
    lines += ["", f"The paper trains {setup.iterations} iterations per task; this run counts "
              "epochs: epochs = round(iterations × batch / mean task size), and joint training "
              "(cumulative sets) gets the epochs giving that many iterations on the final set "
              "of all tasks (column *per task*)."]
  else:
    lines += ["", "Training length: the epochs per task of column *per task*; joint training "
              "trains task t on the union of tasks 1..t for as many epochs."]
  if r["reduced"]:
    lines += ["", "**Reduced protocol** (not the paper's): " + "; ".join(r["deviations"])
              + ". Published numbers (full protocol) are shown for orientation only."]
  err = "std" if setup.err_kind == "std" else "SEM"
  lines += ["", f"Paper column: mean ± {err} over {setup.runs} runs"
            + ("; the *vs paper* test uses their std = SEM × √20." if err == "SEM" else ".")]
  return "\n".join(lines)


def render_group(recs: list[dict]) -> str:
  """Summary (methods × scenarios), detailed table, bracketing check, for one protocol group."""
  by = {(r["algo"], r["scenario"]): r for r in recs}
  setup = get_setup(recs[0]["protocol"], recs[0]["benchmark"])
  algos = [a for a in setup.algos if any(a == r["algo"] for r in recs)]
  scen = [s for s in SCENARIOS if any(s == r["scenario"] for r in recs)]
  out = [_group_header(recs), ""]
  out.append("| method | " + " | ".join(f"{SCENARIO_TITLES[s]} ours | {SCENARIO_TITLES[s]} "
                                        "paper" for s in scen) + " |")
  out.append("|---|" + "---:|---:|" * len(scen))
  for a in algos:
    cells = []
    for s in scen:
      r = by.get((a, s))
      pm = setup.published[a][s]
      cells.append("–" if r is None else f"{r['mean']:.2f} ± {r['std']:.2f}")
      cells.append(f"{pm[0]:.2f} ± {pm[1]:.2f}")
    out.append(f"| {ALGO_TITLES[a]} | " + " | ".join(cells) + " |")
  out += ["", "| scenario | method | λ paper → ours | γ paper → ours | per task | "
          "ours mean ± std (n) | paper | Δ ours − paper | vs paper | wall s |",
          "|---|---|---|---|---:|---|---|---:|---|---:|"]
  for s in scen:
    for a in algos:
      r = by.get((a, s))
      if r is None:
        continue
      lam = ("–" if r["lam_paper"] is None else
             f"{_fmt_lam(r['lam_paper'])} → {_fmt_lam(r['lam'])}")
      gam = ("–" if r["algo"] != "online_ewc" else
             f"{_fmt_lam(r['gamma_paper'])} → {_fmt_lam(r['gamma'])}")
      pub = r["published"]
      out.append(
          f"| {SCENARIO_TITLES[s]} | {ALGO_TITLES[a]} | {lam} | {gam} | {_length(r)} | "
          f"{r['mean']:.2f} ± {r['std']:.2f} ({len(r['seeds'])}) | "
          f"{pub['mean']:.2f} ± {pub['err']:.2f} {'SEM' if pub['err_kind'] == 'sem' else 'std'} "
          f"({pub['runs']}) | {r['mean'] - pub['mean']:+.2f} | {verdict(r)} | "
          f"{r['wall_seconds']:.0f} |")
  checks = [f"{SCENARIO_TITLES[s]}: {bracketing(*trio)}" for s in scen
            if all(trio := [by.get((a, s)) for a in ("finetune", "ewc", "joint")])]
  if checks:
    out += ["", "Bracketing (finetune ≤ EWC ≤ joint; a pair closer than the sum of its "
            "seeds' stds counts as a tie): " + "; ".join(checks) + "."]
  per_seed = [f"{SCENARIO_TITLES[r['scenario']]} {r['algo']}: "
              + ", ".join(f"{v:.2f}" for v in r["average_accuracy"])
              for s in scen for a in algos if (r := by.get((a, s)))]
  out += ["", "<details><summary>Per-seed average accuracy (%)</summary>", "",
          "; ".join(per_seed), "", "</details>"]
  return "\n".join(out)


def render(store: dict) -> str:
  groups: dict[tuple, list[dict]] = {}
  for rec in store["records"].values():
    groups.setdefault((rec["protocol"], rec["benchmark"], rec.get("variant", "")),
                      []).append(rec)
  order = sorted(groups, key=lambda g: (list(PROTOCOLS).index(g[:2]), g[2] != "full", g[2]))
  env = store.get("environment", {})
  parts = [BEGIN, "", "## Results", "",
           f"Average test accuracy (%) over all tasks after the last task. Generated "
           f"{store.get('updated', '')}; raw numbers (per-seed accuracy matrices, configs, "
           f"timings) in the JSON store beside this file. Machine: {env.get('device', '?')}, "
           f"jax {env.get('jax', '?')}."]
  for g in order:
    parts += ["", render_group(groups[g])]
  parts += ["", END]
  return "\n".join(parts)


def splice(old: str | None, block: str, title: str = "# Reproducing published EWC results") -> str:
  """``old`` with the text between the markers replaced by ``block`` (appended if none)."""
  if old is None:
    return f"{title}\n\n{block}\n"
  if BEGIN in old and END in old:
    head, rest = old.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return head + block + tail
  return old.rstrip("\n") + "\n\n" + block + "\n"


def write_outputs(store: dict, out: Path, json_path: Path) -> None:
  store["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  files.write_json(json_path, store)
  old = out.read_text() if out.exists() else None
  files.write_text(out, splice(old, render(store)))


def checkpoint_folder(root: Path, key: str) -> Path:
  """The checkpoint folder of one record (its key, made a plain folder name)."""
  return root / re.sub(r"[^A-Za-z0-9_.=-]+", "_", key).strip("_")


def reproduce(setup: Setup, algos: Sequence[str], scenarios: Sequence[str],
              seeds: Sequence[int], ds, out: Path, json_path: Path,
              overrides: Overrides = Overrides(), progress=None, log=print,
              checkpoint_root: Path | None = None, checkpoint_every: int = 0) -> dict:
  """Runs every (scenario, algo), saving the store and the markdown after each one (the store is
  re-read before each write, so concurrent invocations only race for milliseconds).

  ``checkpoint_root``: each (scenario, algo) sweep checkpoints under its own folder there
  (after each task, and every ``checkpoint_every`` steps); a killed or interrupted invocation
  re-run with the same flags resumes it. A record's checkpoints are deleted once the record is
  stored (the next invocation trains it again, as without checkpoints)."""
  from ewc_jax import checkpoint  # pylint: disable=import-outside-toplevel
  environment = environment_lib.environment()
  total = len(algos) * len(scenarios)
  for i, scenario in enumerate(scenarios):
    for j, algo in enumerate(algos):
      prefix = f"{scenario}/{algo} "
      key = record_key(setup, overrides, scenario, algo)
      saver = None
      if checkpoint_root is not None:
        saver = checkpoint.SweepCheckpointer(
            checkpoint_folder(checkpoint_root, key),
            {"record": key, "seeds": [int(s) for s in seeds],
             "dataset": f"{ds.name}:{ds.version}"},
            every=checkpoint_every, log=lambda line: log(f"  {line}"))
      rec = run_one(setup, algo, scenario, seeds, ds, overrides,
                    progress=progress(prefix) if progress else None, log=log,
                    tag=f"[{i * len(algos) + j + 1}/{total}] ", checkpointer=saver)
      store = load_store(json_path)
      store["environment"] = environment
      store["records"][key] = rec
      write_outputs(store, out, json_path)
      if saver is not None:
        checkpoint.discard(saver.directory)
  return store


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

flags.DEFINE_enum("protocol", "hsu", ["hsu", "vandeven"], "Which paper's protocol.")
flags.DEFINE_enum("benchmark", "split", ["split", "permuted"], "Split MNIST or Permuted MNIST "
                  "(Permuted: --protocol=vandeven only).")
flags.DEFINE_list("algos", None, "Algorithms (default: every one the paper reports).")
flags.DEFINE_list("scenarios", list(SCENARIOS), "Scenarios: task, domain, class.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, trained together as one vmapped run.")
flags.DEFINE_integer("epochs", None, "Override the epochs per task (marks the result reduced).")
flags.DEFINE_list("hidden", None, "Override the MLP widths (marks the result reduced).")
flags.DEFINE_integer("max_examples", None, "Keep the first N train and test examples of each "
                     "task (marks the result reduced).")
flags.DEFINE_integer("num_tasks", None, "Override the number of tasks (marks it reduced).")
flags.DEFINE_float("lam_factor", None, "A λ check: multiply the translated λ by this factor "
                   "(stored and shown apart, as a reduced variant).")
flags.DEFINE_string("out", "docs/results.md", "Markdown file: the tables are rewritten between "
                    "two markers, the rest of the file is kept.")
flags.DEFINE_string("json", None, "JSON store of every result (default: --out with .json).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default as in experiments.split_mnist).")
flags.DEFINE_string("workdir", "runs/reproduce", "Where the runs' checkpoints live (under "
                    "<workdir>/checkpoints, one folder per scenario/algorithm, deleted once its "
                    "record is stored); locked for the run.")
flags.DEFINE_bool("checkpoint", True, "Checkpoint each sweep after every task (and every "
                  "--checkpoint_every steps); re-running a killed or interrupted invocation "
                  "resumes it bit for bit.")
flags.DEFINE_integer("checkpoint_every", 0, "Also checkpoint within a task every N train steps "
                     "(whole chunks of 64); 0: only after each task.")
flags.DEFINE_bool("progress", True, "Show a progress bar per task.")
flags.DEFINE_bool("compile_cache", True, "Use JAX's persistent compilation cache.")
flags.DEFINE_bool("debug", False, "Show full tracebacks for user errors.")
FLAGS = flags.FLAGS


def _ints(name: str, values) -> tuple[int, ...]:
  try:
    out = tuple(int(v) for v in values)
  except (TypeError, ValueError) as err:
    raise ValueError(f"--{name}={','.join(map(str, values))} is invalid: expected integers "
                     "separated by commas.") from err
  if not out or any(v < (0 if name == "seeds" else 1) for v in out):
    raise ValueError(f"--{name}={','.join(map(str, values))} is invalid: expected "
                     + ("seeds >= 0." if name == "seeds" else "integers >= 1."))
  return out


def parse() -> tuple[Setup, tuple[str, ...], tuple[str, ...], tuple[int, ...], Overrides]:
  setup = get_setup(FLAGS.protocol, FLAGS.benchmark)
  algos = tuple(FLAGS.algos) if FLAGS.algos else setup.algos
  for a in algos:
    if a not in setup.published:
      raise ValueError(f"--algos={','.join(algos)} is invalid for --protocol={setup.protocol} "
                       f"--benchmark={setup.benchmark}: expected some of "
                       f"{', '.join(setup.algos)}.")
  scenarios = tuple(FLAGS.scenarios)
  for s in scenarios:
    if s not in SCENARIOS:
      raise ValueError(f"--scenarios={','.join(scenarios)} is invalid: expected some of "
                       f"{', '.join(SCENARIOS)}.")
  seeds = _ints("seeds", FLAGS.seeds)
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds={','.join(FLAGS.seeds)} is invalid: expected distinct seeds.")
  for name in ("epochs", "max_examples", "num_tasks"):
    value = getattr(FLAGS, name)
    if value is not None and value < 1:
      raise ValueError(f"--{name}={value} is invalid: expected an integer >= 1.")
  bench = BENCHMARKS[setup.benchmark]
  if FLAGS.num_tasks is not None and bench.max_tasks and FLAGS.num_tasks > bench.max_tasks:
    raise ValueError(f"--num_tasks={FLAGS.num_tasks} is invalid: expected 1..{bench.max_tasks}.")
  if FLAGS.lam_factor is not None and not (math.isfinite(FLAGS.lam_factor)
                                            and FLAGS.lam_factor > 0):
    raise ValueError(f"--lam_factor={FLAGS.lam_factor} is invalid: expected a number > 0.")
  overrides = Overrides(epochs=FLAGS.epochs,
                        hidden=_ints("hidden", FLAGS.hidden) if FLAGS.hidden else None,
                        max_examples=FLAGS.max_examples, num_tasks=FLAGS.num_tasks,
                        lam_factor=FLAGS.lam_factor)
  return setup, algos, scenarios, seeds, overrides


def main(argv):
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  from ewc_jax import checkpoint, interrupt  # pylint: disable=import-outside-toplevel
  from experiments import data, lock  # pylint: disable=import-outside-toplevel
  if not FLAGS.debug:
    checkpoint.quiet_orbax_errors()
  try:
    with interrupt.catch(), contextlib.ExitStack() as held:
      setup, algos, scenarios, seeds, overrides = parse()
      if FLAGS.checkpoint_every is None or FLAGS.checkpoint_every < 0:
        raise ValueError(f"--checkpoint_every={FLAGS.checkpoint_every} is invalid: expected an "
                         "integer >= 0 (0: only after each task).")
      out = Path(FLAGS.out)
      json_path = Path(FLAGS.json) if FLAGS.json else out.with_suffix(".json")
      for path in (out, json_path):
        files.check_workdir(str(path.parent))
      root = None
      if FLAGS.checkpoint:
        workdir = files.check_workdir(FLAGS.workdir)
        held.enter_context(lock.hold(workdir))  # another invocation on it exits 2 at once
        root = workdir / "checkpoints"
      if FLAGS.compile_cache:
        compile_cache.enable()
      ds = data.load_dataset("mnist", data_dir=FLAGS.data_dir)
      print(f"{setup.citation}\n{len(scenarios) * len(algos)} runs of {len(seeds)} seeds"
            + (f"; REDUCED: {'; '.join(overrides.describe())}" if overrides.reduced else ""),
            flush=True)
      t0 = time.perf_counter()
      progress = ((lambda prefix: progress_lib.make(True, prefix)) if FLAGS.progress else None)
      reproduce(setup, algos, scenarios, seeds, ds, out, json_path, overrides,
                progress=progress, log=lambda *a, **k: print(*a, **k, flush=True),
                checkpoint_root=root, checkpoint_every=FLAGS.checkpoint_every)
      print(f"total {time.perf_counter() - t0:.0f} s (startup {t0 - _START:.1f} s); "
            f"wrote {out} and {json_path}")
  except interrupt.Interrupted as err:
    print(f"\n{err}", file=sys.stderr, flush=True)
    sys.exit(err.exit_code)
  except jax.errors.JaxRuntimeError:
    raise
  except (ValueError, data.DataError) as err:
    if FLAGS.debug:
      raise
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
