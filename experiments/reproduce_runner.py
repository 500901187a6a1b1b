"""Runs the papers' rows: each (scenario, algorithm) one vmapped sweep over the seeds (split
benchmarks), or one sweep per seed, each on its own tasks (permuted benchmarks).

:func:`run_one` trains one row on the tasks of the benchmark registry
(``experiments.task_sequences``) with the paper's inputs (``Setup.build_options``: van de Ven &
Tolias' Permuted MNIST padded to 32x32, every task permuted, each seed its own permutations) and
the network of ``heads.make_network`` initialised as in the paper's code (``Setup.init``), with
the paper's hyperparameters in our terms (:mod:`experiments.paper_tables`) and its protocol
controls: training length per task as the paper counts it (iterations,
``Config.steps_per_task``, or epochs), Adam kept across tasks, every parameter shared by several
tasks penalised. :func:`reproduce` runs every row of an invocation and stores each record as soon
as it is done (:mod:`experiments.results_store`, :mod:`experiments.results_report`),
checkpointing its sweeps meanwhile. Everything comes in as arguments: nothing here reads a flag.
Departures from the protocol (:class:`Overrides`) make a *reduced* variant, stored and shown
apart.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
import re
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import checkpoint
from ewc_jax import continual
from ewc_jax import heads
from ewc_jax.continual import step as step_lib
from ewc_jax.continual import sweep
from experiments import environment as environment_lib
from experiments import files
from experiments import results_report
from experiments import results_store
from experiments import signals
from experiments import tasks
from experiments.paper_tables import BENCHMARKS
from experiments.paper_tables import SCENARIO_TITLES
from experiments.paper_tables import Setup
from experiments.paper_tables import hyper_for
from experiments.paper_tables import length_for


@dataclasses.dataclass(frozen=True)
class Overrides:
  """Departures from the published protocol (each one makes the result *reduced*)."""
  epochs: int | None = None
  hidden: tuple[int, ...] | None = None
  max_examples: int | None = None
  num_tasks: int | None = None
  lam_factor: float | None = None  # a λ check: our translated λ times this factor

  def describe(self) -> list[str]:
    """The departures in words, in a fixed order (they name the variant)."""
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
    """Whether anything departs from the paper's protocol."""
    return bool(self.describe())

  @property
  def variant(self) -> str:
    """``"full"``, or ``"reduced[...]"`` naming the departures (each variant is stored apart)."""
    return results_store.variant_name(self.describe())


def hsu_preprocess(x):
  """Hsu et al.'s MNIST input: zero-pad 28x28 to 32x32, then (x/255 − 0.1) / 0.2752."""
  x = x.reshape((x.shape[0], 28, 28)).astype(jnp.float32) / 255.0
  x = jnp.pad(x, ((0, 0), (2, 2), (2, 2)))
  return ((x - 0.1) / 0.2752).reshape((x.shape[0], 32 * 32))


def preprocess_fn(setup: Setup):
  """The input preprocessing of ``setup``'s paper: Hsu et al.'s, or pixels / 255."""
  return hsu_preprocess if setup.preprocess == "hsu" else step_lib.scale_pixels


def iterations(cfg, count: int) -> int:
  """Optimizer steps on a training set of ``count`` examples under ``cfg``'s schedule."""
  epochs, steps, last = cfg.schedule(count)
  return (epochs - 1) * steps + last


def seed_groups(setup: Setup, seeds: Sequence[int]) -> list[list[int]]:
  """The seeds trained together on one build of the tasks: all of them for a benchmark whose
  tasks do not depend on the seed (split: fixed classes), else one group per seed (permuted:
  each seed its own permutations, ``Benchmark.data_follows_seed``)."""
  seeds = [int(s) for s in seeds]
  return [[s] for s in seeds] if BENCHMARKS[setup.benchmark].data_follows_seed else [seeds]


def build_tasks(setup: Setup, ds, scenario: str, seed: int, *,
                overrides: Overrides = Overrides()):
  """The tasks of ``seed`` (on the host): the benchmark's builder, the one the command lines
  call (``experiments.train.build_tasks``), with the setup's ``build_options`` (van de Ven's
  Permuted MNIST: ``pad=2``, ``permute_first=True``)."""
  return BENCHMARKS[setup.benchmark].build(ds, scenario, overrides.num_tasks or setup.num_tasks,
                                           overrides.max_examples, int(seed),
                                           **setup.build_options)


def seed_checkpointer(checkpointer, seed: int):
  """The checkpointer of one seed's sweep: ``checkpointer``'s settings, its folder's
  ``seed_<seed>`` subfolder, its identity plus the seed (None without a checkpointer)."""
  if checkpointer is None:
    return None
  return checkpoint.SweepCheckpointer(checkpointer.directory / f"seed_{int(seed)}",
                                      {**checkpointer.config, "seed": int(seed)},
                                      log=checkpointer.log, **checkpointer.kwargs)


def inputs_of(setup: Setup, built, per_seed: bool) -> dict:
  """What the record says about its inputs: the network's input width (after the setup's
  preprocessing), the builder options, whether each seed had its own tasks."""
  example = jax.ShapeDtypeStruct((1,) + tuple(built.train.inputs.shape[2:]),
                                 built.train.inputs.dtype)
  shape = jax.eval_shape(preprocess_fn(setup), example).shape
  return {"num_inputs": int(math.prod(shape[1:])), **setup.build_options,
          "tasks_per_seed": per_seed}


def _sweep(setup: Setup, base: continual.Config, built, seeds: Sequence[int], *, progress,
           checkpointer) -> sweep.SweepResult:
  """One vmapped sweep of ``base`` over ``seeds``, all on the tasks ``built``."""
  train, test = tasks.to_device(built.train), tasks.to_device(built.test)
  net = heads.make_network(base.scenario, built.class_groups, base.hidden)
  return sweep.run(sweep.grid(base, seed=[int(s) for s in seeds]), net, train, test,
                   preprocess=preprocess_fn(setup), progress=progress,
                   checkpointer=checkpointer, stop_requested=signals.requested)


def run_one(setup: Setup, algo: str, scenario: str, seeds: Sequence[int], ds, *,
            overrides: Overrides = Overrides(), progress=None, log=print, tag: str = "",
            checkpointer=None) -> dict:
  """Trains ``algo`` in ``scenario`` for every seed; returns the record.

  The seeds of a benchmark whose tasks do not depend on the seed (split) are one vmapped sweep
  on one build of the tasks; a permuted benchmark's seeds are one sweep each, each on its own
  tasks (its own permutations), built as the command lines build them (:func:`seed_groups`,
  :func:`build_tasks`). The record assembles the seeds in order either way.

  ``checkpointer``: an ``ewc_jax.checkpoint.SweepCheckpointer`` (the sweep's state is saved
  after each task and resumed from when its folder holds it; one sweep per seed saves under
  its ``seed_<s>`` subfolder, :func:`seed_checkpointer`), or None."""

  if algo not in setup.published:
    raise ValueError(f"--algos={algo!r} is invalid for --protocol={setup.protocol} "
                     f"--benchmark={setup.benchmark}: the paper reports "
                     f"{', '.join(setup.algos)}.")
  t0 = time.perf_counter()
  lam_paper, gamma_paper, lam, gamma = hyper_for(setup, algo, scenario)
  if lam_paper is not None and overrides.lam_factor is not None:
    lam = lam * overrides.lam_factor
  groups = seed_groups(setup, seeds)
  per_seed = BENCHMARKS[setup.benchmark].data_follows_seed
  built = build_tasks(setup, ds, scenario, groups[0][0], overrides=overrides)
  counts = [int(c) for c in np.asarray(built.train.counts)]
  epochs, steps_per_task = length_for(setup, algo, counts, overrides.epochs)
  base = continual.Config(algo=algo, scenario=scenario, lam=lam, gamma=gamma, fisher=setup.fisher,
                          batch_size=setup.batch_size, lr=setup.lr,
                          hidden=tuple(overrides.hidden or setup.hidden),
                          seed=groups[0][0], reset_optimizer=setup.reset_optimizer,
                          init=setup.init, epochs=epochs, steps_per_task=steps_per_task)
  base.validate()
  inputs = inputs_of(setup, built, per_seed)
  log(f"{tag}{setup.protocol}/{setup.benchmark} {SCENARIO_TITLES[scenario]} {algo}: "
      + (f"λ paper {lam_paper:g} -> ours {lam:g}, γ {gamma:g}, " if lam_paper is not None else "")
      + (f"{epochs} epochs/task" if epochs is not None else f"{steps_per_task} iterations/task")
      + f", Adam {'reset' if base.reset_optimizer else 'kept'}, consolidated "
      f"{base.consolidated}, {inputs['num_inputs']} inputs, init {base.init}, seeds "
      f"{','.join(map(str, seeds))}"
      + (" (one sweep per seed, each on its own tasks)" if per_seed else ""))
  results = []
  for i, group in enumerate(groups):
    if i:
      built = build_tasks(setup, ds, scenario, group[0], overrides=overrides)
    results.append(_sweep(setup, base, built, group, progress=progress,
                          checkpointer=(seed_checkpointer(checkpointer, group[0]) if per_seed
                                        else checkpointer)))
  record = _record(setup, base, results, seeds=seeds, counts=counts, overrides=overrides,
                   lam_paper=lam_paper, gamma_paper=gamma_paper, inputs=inputs)
  record["wall_seconds"] = time.perf_counter() - t0
  mean, err = setup.published[algo][scenario]
  log(f"  -> {record['mean']:.2f} ± {record['std']:.2f} (paper {mean:.2f} ± {err:.2f} "
      f"{setup.err_kind}), {record['wall_seconds']:.0f} s")
  return record


def _record(setup: Setup, base: continual.Config, results: Sequence[sweep.SweepResult], *,
            seeds: Sequence[int], counts: Sequence[int], overrides: Overrides,
            lam_paper, gamma_paper, inputs: dict) -> dict:
  """The stored record of a row from its sweeps' results (the seeds in order; timings summed
  over the sweeps; ``wall_seconds`` is the caller's)."""
  acc = np.concatenate([np.asarray(r.acc_matrix, np.float64) for r in results])  # [K, T, T]
  final = 100.0 * acc[:, -1, :].mean(-1)                     # average accuracy per seed (%)
  mean, err = setup.published[base.algo][base.scenario]
  # The training set of each task: joint trains task t on the union of tasks 1..t.
  sizes = list(itertools.accumulate(counts)) if base.algo == "joint" else counts
  timings: dict[str, float] = {}
  for r in results:
    for k, v in r.timings.items():
      timings[k] = timings.get(k, 0.0) + float(v)
  return {
      "protocol": setup.protocol, "benchmark": setup.benchmark, "scenario": base.scenario,
      "algo": base.algo, "seeds": [int(s) for s in seeds],
      "reduced": overrides.reduced, "variant": overrides.variant,
      "deviations": overrides.describe(),
      "lam_paper": lam_paper, "gamma_paper": gamma_paper, "lam": base.lam, "gamma": base.gamma,
      "epochs": base.epochs, "steps_per_task": base.steps_per_task,
      "reset_optimizer": bool(base.reset_optimizer), "consolidated": base.consolidated,
      "task_sizes": list(counts), "num_tasks": len(counts), "inputs": inputs,
      "hidden": list(base.hidden), "lr": base.lr, "batch_size": base.batch_size,
      "fisher": base.fisher, "max_examples": overrides.max_examples,
      "iterations_per_task": [iterations(base, n) for n in sizes],
      "average_accuracy": final.tolist(),
      "mean": float(final.mean()), "std": float(final.std()),
      "sem": float(final.std(ddof=1) / math.sqrt(len(final))) if len(final) > 1 else None,
      "published": {"mean": mean, "err": err, "err_kind": setup.err_kind, "runs": setup.runs},
      "acc_matrix": acc.tolist(),
      "bwt": [s["bwt"] for r in results for s in r.summaries],
      "timings": timings,
      "config": dataclasses.asdict(base),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def row_key(setup: Setup, overrides: Overrides, scenario: str, algo: str) -> str:
  """The store key of one row (:func:`experiments.results_store.record_key`)."""
  return results_store.record_key(setup.protocol, setup.benchmark, overrides.variant, scenario,
                                  algo)


def checkpoint_folder(root: Path, key: str) -> Path:
  """The checkpoint folder of one record (its key, made a plain folder name)."""
  return root / re.sub(r"[^A-Za-z0-9_.=-]+", "_", key).strip("_")


def reproduce(setup: Setup, algos: Sequence[str], scenarios: Sequence[str],
              seeds: Sequence[int], ds, *, out: Path, json_path: Path,
              overrides: Overrides = Overrides(), progress=None, log=print,
              checkpoint_root: Path | None = None, checkpoint_every: int = 0,
              rerun: bool = False) -> dict:
  """Runs every (scenario, algo), saving the store and the markdown after each one (the store is
  re-read before each write, so concurrent invocations only race for milliseconds).

  A row the store already holds for the same seeds is kept as it is, not trained again (an
  invocation of several rows, stopped and started again, goes on with the first missing row);
  ``rerun=True`` trains every row anew.

  ``checkpoint_root``: each (scenario, algo) row checkpoints under its own folder there (after
  each task, and every ``checkpoint_every`` steps; a row of one sweep per seed: one subfolder
  per seed, :func:`seed_checkpointer`); a killed or interrupted invocation
  re-run with the same flags resumes it. A record's checkpoints are deleted once the record is
  stored (the next invocation trains it again, as without checkpoints)."""
  environment = environment_lib.environment()
  total = len(algos) * len(scenarios)
  for i, scenario in enumerate(scenarios):
    for j, algo in enumerate(algos):
      prefix = f"{scenario}/{algo} "
      tag = f"[{i * len(algos) + j + 1}/{total}] "
      key = row_key(setup, overrides, scenario, algo)
      stored = results_store.load_store(json_path)["records"].get(key)
      if not rerun and stored is not None and stored.get("seeds") == [int(s) for s in seeds]:
        log(f"{tag}{key}: stored ({stored['mean']:.2f} ± "
            f"{stored['std']:.2f}), kept (--rerun trains it again)")
        continue
      saver = None
      if checkpoint_root is not None:
        saver = checkpoint.SweepCheckpointer(
            checkpoint_folder(checkpoint_root, key),
            {"record": key, "seeds": [int(s) for s in seeds],
             "dataset": f"{ds.name}:{ds.version}"},
            every=checkpoint_every, log=lambda line: log(f"  {line}"),
            stop_requested=signals.requested)
      rec = run_one(setup, algo, scenario, seeds, ds, overrides=overrides,
                    progress=progress(prefix) if progress else None, log=log,
                    tag=tag, checkpointer=saver)
      store = results_store.add_record(json_path, key, rec, environment)
      results_store.save(store, json_path)
      results_report.write_markdown(store, out)
      if saver is not None:
        files.discard(saver.directory)
  return results_store.load_store(json_path)
