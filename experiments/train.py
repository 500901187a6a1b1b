"""``train_and_evaluate(config, workdir)``: one experiment, from its config, reading no flag.

Loads the dataset, builds the benchmark's tasks, runs every seed through
:func:`ewc_jax.continual.run` (checkpointed and resumable), prints the accuracy matrix and writes
``results.json``, ``acc_matrix.csv`` and the plots under ``workdir``. Errors in the settings are
:class:`ewc_jax.errors.SettingError` naming the config field (the command lines spell it as a
flag).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ewc_jax import checkpoint
from ewc_jax import continual
from ewc_jax import errors
from ewc_jax import interrupt
from ewc_jax.continual import holdout
from ewc_jax.continual import metrics
from experiments import compile_cache
from experiments import config as config_lib
from experiments import data
from experiments import environment
from experiments import files
from experiments import input_norm
from experiments import plots
from experiments import progress as progress_lib
from experiments import report
from experiments import signals
from experiments import tasks
from experiments import tensorboard


def load_dataset(config: config_lib.ExperimentConfig):
  """The config's dataset from ``data_dir`` / ``manual_dir`` (any TFDS image-classification
  dataset: any HxWxC, any number of classes)."""
  data_dir = config.data_dir
  if (data_dir and not os.path.isdir(data_dir) and config.manual_dir is None
      and importlib.util.find_spec("tensorflow") is None):  # nothing could prepare it there
    raise errors.SettingError(lambda n: (
        f"{n('data_dir')}={data_dir!r} is not an existing folder: expected a TFDS data folder "
        "holding the prepared dataset (see `make prepare-data`)."))
  return data.load_dataset(config.dataset_name, data_dir=data_dir, manual_dir=config.manual_dir)


def check_batch_size(batch_size: int, counts, validation_fraction: float = 0.0,
                     max_examples: int | None = None) -> None:
  """:func:`ewc_jax.continual.holdout.check_batch_size`, blaming ``max_examples`` when it made
  the smallest task too small for one batch."""

  def blame(task, count, kept, held):
    if max_examples is None or count < max_examples:
      return None
    return errors.SettingError(lambda n: (
        f"{n('max_examples')}={max_examples!r} is too small for {n('batch_size')}={batch_size}: "
        f"task {task} keeps {kept} training examples"
        + (" after the validation split" if held else "")
        + f"; expected {n('max_examples')} large enough for one batch (or a smaller batch)."))
  holdout.check_batch_size(batch_size, counts, validation_fraction, blame=blame)


def prepare_checkpoints(config: config_lib.ExperimentConfig, root: Path, pattern: str = "seed_*",
                        identity: dict | None = None) -> None:
  """``force_restart`` discards old checkpoints; ``resume=False`` refuses existing ones; with
  ``identity``, each existing run's checkpoints must come from it."""
  if config.force_restart:
    if files.discard(root):
      print(f"--force_restart: discarded the checkpoints in {root}")
    return
  existing = files.checkpoint_dirs(root, pattern)
  if existing and not config.resume:
    raise errors.SettingError(lambda n: (
        f"{n('resume', False)}: {root} already holds checkpoints; pass {n('resume')} to "
        f"continue them or {n('force_restart')} to discard them and start over."))
  for folder in existing if identity is not None else ():
    with checkpoint.RunCheckpointer(folder, identity,
                                    added=config_lib.IDENTITY_ADDED) as ckpt:
      ckpt.check_config()


def build_tasks(config: config_lib.ExperimentConfig, ds, run: continual.Config):
  """The benchmark's tasks for the seed of ``run`` (on the host)."""
  return config.bench.build(ds, run.scenario, config.task_count, config.max_examples, run.seed,
                            config.classes_per_task, **config.build_options)


def train_and_evaluate(config: config_lib.ExperimentConfig, workdir: str | os.PathLike, *,
                       import_seconds: float = 0.0, start_time: float | None = None) -> dict:
  """Runs every seed of ``config``; returns the record written to ``workdir/results.json``.

  ``import_seconds`` / ``start_time`` only feed ``timings`` (a command line's start-up). The
  checkpointers are closed last, so the newest background save overlaps the writing of the
  results; ``timings["checkpoint"]`` counts the waiting for saves up to then.
  """
  config.validate()
  workdir = Path(workdir)
  t0 = time.perf_counter()
  ds = load_dataset(config)
  config = config.resolved(ds.num_classes)
  load_seconds = time.perf_counter() - t0
  with contextlib.ExitStack() as savers:
    return _train_and_evaluate(config, workdir, ds, savers,
                               {"import": import_seconds, "load": load_seconds}, start_time)


def _run_seed(config: config_lib.ExperimentConfig, run: continual.Config, built, preprocess, *,
              workdir: Path, savers: contextlib.ExitStack, identity: dict,
              on_training: Callable[[], Any] | None = None) -> tuple[Any, dict]:
  """One seed, checkpointed (resumed when a checkpoint exists): ``(result, entry fields)``.

  ``on_training``: called once, when the first chunk of training has run (work for a
  background thread: from then on the main thread mostly waits on XLA, without the GIL)."""
  seeds = config.seed_list
  train, test = tasks.to_device(built.train), tasks.to_device(built.test)
  net = continual.make_network(run, built.class_groups)
  prefix = f"seed {run.seed} " if len(seeds) > 1 else ""
  ckpt = savers.enter_context(checkpoint.RunCheckpointer(
      workdir / "checkpoints" / f"seed_{run.seed}", identity, keep=config.keep,
      every=config.checkpoint_every, chunk_steps=run.chunk_steps,
      warn=report.warning, stop_requested=signals.requested,
      added=config_lib.IDENTITY_ADDED)) if config.checkpoint else None
  resume = (ckpt.restore(lambda: continual.abstract_run_state(run, net, train,
                                                               preprocess=preprocess))
            if ckpt is not None else None)
  resumed_from = None
  if resume is not None:
    resumed_from = str(ckpt.step_path(ckpt.restored_step))
    where = continual.describe_position(resume, run, np.asarray(train.counts))
    print(f"{prefix}resuming from {resumed_from} ({where})", flush=True)
  hook = ckpt if ckpt is not None else interrupt.stop_hook(signals.requested)
  if config.tensorboard:  # scalars first: an interrupt raised by the checkpointer keeps them
    logger = tensorboard.ScalarLogger(workdir / "tensorboard" / f"seed_{run.seed}",
                                      start=resume)
    savers.callback(logger.close)
    hook = tensorboard.chain(logger, hook)
  if on_training is not None:
    hook = tensorboard.chain(_once(on_training), hook)
  result = continual.run(run, net, train, test, preprocess=preprocess, resume=resume,
                         on_checkpoint=hook, progress=progress_lib.make(config.progress, prefix),
                         compile_fn=_compiler(config, run, built, preprocess, train, test))
  return result, {"resumed_from": resumed_from,
                  "checkpoint": ckpt.save_seconds if ckpt is not None else 0.0}


def _once(fn: Callable[[], Any]) -> Callable[..., None]:
  """An ``on_checkpoint`` hook calling ``fn()`` at its first call only."""
  pending = [fn]

  def hook(*_):
    if pending:
      pending.pop()()
  return hook


def _compiler(config: config_lib.ExperimentConfig, run: continual.Config, built, preprocess,
                 train, test):
  """The compiler of this run: a store of executables under its key (``None``, i.e. compiled
  afresh or by JAX's persistent cache, without ``compile_cache``)."""
  if not config.compile_cache:
    return None
  return compile_cache.run_executables(config, run, built, preprocess, train, test)


def _train_and_evaluate(config: config_lib.ExperimentConfig, workdir: Path, ds,
                        savers: contextlib.ExitStack, start: dict,
                        start_time: float | None) -> dict:

  seeds = config.seed_list
  identity = config.identity(f"{ds.name}:{ds.version}")
  preprocess = input_norm.make(config.input_norm_name, ds.train_images)
  runs = []
  for seed in seeds:
    run = dataclasses.replace(config.run, seed=seed)
    t0 = time.perf_counter()
    built = build_tasks(config, ds, run)
    data_seconds = start["load"] + time.perf_counter() - t0
    if not runs:  # checks and checkpoint preparation, before anything is trained or written
      check_batch_size(config.run.batch_size, built.train.counts,
                       config.run.validation_fraction, config.max_examples)
      if config.checkpoint:
        prepare_checkpoints(config, workdir / "checkpoints", identity=identity)
    # matplotlib's import overlaps the training, started once the first chunk has run: before
    # that (data to the device, programs loaded) the main thread needs the GIL too.
    result, extra = _run_seed(config, run, built, preprocess, workdir=workdir, savers=savers,
                              identity=identity,
                              on_training=plots.prefetch if config.plots and not runs else None)
    timings = {"import": start["import"], "data": data_seconds, **result.timings,
               "checkpoint": extra["checkpoint"]}
    entry = {"seed": seed, "resumed_from": extra["resumed_from"],
             "acc_matrix": [[float(v) for v in row] for row in result.acc_matrix],
             **metrics.summarize(result.acc_matrix), "curves": result.curves,
             "timings": timings}
    if config.shuffle_classes:  # each seed has its own class groups
      entry["class_groups"] = built.info["class_groups"]
    if result.val_acc_matrix is not None:
      entry["val_acc_matrix"] = np.asarray(result.val_acc_matrix).tolist()
      entry["validation"] = metrics.summarize(result.val_acc_matrix)
    runs.append(entry)
    start = {"import": 0.0, "load": 0.0}
  record = _record(config, ds, built, runs, start_time, getattr(preprocess, "stats", None))
  _write_outputs(config, workdir, record)
  return record


def _record(config: config_lib.ExperimentConfig, ds, built, runs: list[dict],
            start_time: float | None, input_stats: dict | None = None) -> dict:
  """results.json: the mean (± std) matrix and metrics over seeds, every seed's run, the
  config, timings and environment."""
  mats = np.array([r["acc_matrix"] for r in runs])
  mean, std = mats.mean(0), mats.std(0)
  per_seed = {k: [r[k] for r in runs] for k in ("average_accuracy", "bwt")}
  timings = {k: float(sum(r["timings"][k] for r in runs)) for k in runs[0]["timings"]}
  timings["data_from_cache"] = bool(ds.from_cache)
  if start_time is not None:
    timings["total"] = time.perf_counter() - start_time
  val = None
  if "val_acc_matrix" in runs[0]:
    val = np.mean([r["val_acc_matrix"] for r in runs], 0)
  return {
      "benchmark": {"name": config.benchmark, "scenario": config.run.scenario,
                    "dataset": f"{ds.name}:{ds.version}", "num_tasks": config.task_count,
                    "max_examples": config.max_examples, "input_norm": config.input_norm,
                    **{k: v for k, v in built.info.items()
                       if not (config.shuffle_classes and k == "class_groups")},
                    **benchmark_info(ds, input_stats)},
      "acc_matrix": mean.tolist(),
      "acc_matrix_std": std.tolist(),
      **metrics.summarize(mean),
      **({} if val is None else {"val_acc_matrix": val.tolist(),
                                 "validation": metrics.summarize(val)}),
      "seeds": list(config.seed_list),
      "average_accuracy_mean": float(np.mean(per_seed["average_accuracy"])),
      "average_accuracy_std": float(np.std(per_seed["average_accuracy"])),
      "bwt_mean": float(np.mean(per_seed["bwt"])),
      "bwt_std": float(np.std(per_seed["bwt"])),
      "curves": runs[0]["curves"] if len(runs) == 1 else [r["curves"] for r in runs],
      "runs": runs,
      "config": dataclasses.asdict(config.run),
      "experiment": {k: v for k, v in dataclasses.asdict(config).items() if k != "run"},
      "timings": timings,
      "environment": environment.environment(),
  }


def benchmark_info(ds, input_stats: dict | None) -> dict:
  """What results.json records about the data beyond the tasks: image shape and class count
  (other than MNIST's) and the per-channel statistics used."""
  shape, classes = list(ds.train_images.shape[1:]), ds.num_classes
  info = {} if (shape == [28, 28, 1] and classes == 10) else {"image_shape": shape,
                                                              "num_classes": classes}
  return {**info, **({"input_stats": input_stats} if input_stats else {})}


def _write_outputs(config: config_lib.ExperimentConfig, workdir: Path, record: dict) -> None:
  """results.json, acc_matrix.csv, the plots, and the printed table and summary."""
  run, seeds = config.run, config.seed_list
  mean, std = np.asarray(record["acc_matrix"]), np.asarray(record["acc_matrix_std"])
  several = len(seeds) > 1
  files.write_json(workdir / "results.json", record)
  files.write_text(workdir / "acc_matrix.csv", report.matrix_csv(mean))
  title = (f"{config.bench.title} ({run.scenario}-incremental), {run.algo}, "
           f"λ={run.lam:g}, fisher={run.fisher}, seeds={','.join(map(str, seeds))}")
  if config.plots:
    plots.accuracy_heatmap(mean, workdir / "acc_matrix.png", title)
    plots.accuracy_over_training(mean, std if several else None,
                                 workdir / "accuracy_over_training.png", title)
  print(f"\n{title}")
  print(report.format_matrix(mean.tolist(), std.tolist() if several else None))
  aa = 100 * np.array([r["average_accuracy"] for r in record["runs"]])
  bwt = 100 * np.array([r["bwt"] for r in record["runs"]])
  print(f"average accuracy {aa.mean():.2f} ± {aa.std():.2f}  BWT {bwt.mean():+.2f} ± "
        f"{bwt.std():.2f}  mean forgetting {100 * record['mean_forgetting']:.2f}"
        + (f"  ({len(seeds)} seeds)" if several else ""))
  if "validation" in record:
    print(f"validation split ({100 * run.validation_fraction:g}% of each task's training "
          f"data): average accuracy {100 * record['validation']['average_accuracy']:.2f}")
  print("seconds: " + "  ".join(f"{k} {v:.2f}" for k, v in record["timings"].items()
                                if isinstance(v, float)))
  print(f"wrote {workdir}/results.json, acc_matrix.csv" + (", *.png" if config.plots else ""))


__all__ = ["train_and_evaluate", "load_dataset", "build_tasks",
           "prepare_checkpoints", "check_batch_size", "benchmark_info"]
