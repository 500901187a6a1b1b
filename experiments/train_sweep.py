"""``train_and_evaluate_sweep(config, workdir)``: a vmapped sweep from its config, reading no flag.

Every combination of the swept values (:class:`experiments.config.SweepConfig`) is trained at
once through :func:`ewc_jax.continual.sweep.run` (one program with a leading config axis, sharded over the
devices; ``max_parallel`` at a time). When the benchmark's data follow the seed (Permuted
MNIST's permutations), each seed is its own sweep on its own data. Writes ``results.json``
(every config's test and validation matrices, metrics and curves, and the table ranked by
validation average accuracy) and ``average_accuracy.png``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from ewc_jax import checkpoint
from ewc_jax import continual
from ewc_jax.continual import metrics
from ewc_jax.continual import sweep
from experiments import compile_cache
from experiments import config as config_lib
from experiments import environment
from experiments import files
from experiments import input_norm
from experiments import plots
from experiments import progress as progress_lib
from experiments import report
from experiments import signals
from experiments import tasks
from experiments import train as train_lib


def _groups(config: config_lib.SweepConfig, configs) -> list[list[int]]:
  """Config indices by data: one group, or one per seed when the data follow the seed."""
  follows = config.experiment.data_follows_seed
  groups: dict = {}
  for k, cfg in enumerate(configs):
    groups.setdefault(cfg.seed if follows else None, []).append(k)
  return list(groups.values())


def run_sweep(config: config_lib.SweepConfig, ds, checkpoints: tuple[Path, dict] | None = None):
  """Runs the sweep; ``(SweepResult, layouts, built tasks, class groups)``: the last, with
  ``--shuffle_classes``, each config's class groups (each seed has its own), else None.

  ``checkpoints``: ``(root folder, identity)``: group g checkpoints under ``root/group_<g>``.
  """


  exp = config.experiment
  configs = config.configs()
  groups = _groups(config, configs)
  acc, val_acc, curves = [None] * len(configs), [None] * len(configs), [None] * len(configs)
  diverged: dict = {}
  timings: dict = {"data": 0.0}
  layouts, built, result = [], None, None
  class_groups = [None] * len(configs)
  preprocess = input_norm.make(exp.input_norm_name, ds.train_images)
  for g, members in enumerate(groups):
    first = configs[members[0]]
    t0 = time.perf_counter()
    built = train_lib.build_tasks(exp, ds, first)
    for k in members:
      class_groups[k] = built.info["class_groups"]
    train, test = tasks.to_device(built.train), tasks.to_device(built.test)
    timings["data"] += time.perf_counter() - t0
    train_lib.check_batch_size(first.batch_size, built.train.counts,
                               first.validation_fraction, exp.max_examples)
    net = continual.make_network(first, built.class_groups)
    bar = {"prefix": ""}

    def on_chunk(i, n, idx, g=g, members=members):
      del i
      parts = ([f"seed group {g + 1}/{len(groups)}"] if len(groups) > 1 else []) + (
          [f"configs {members[idx.start] + 1}-{members[idx.stop - 1] + 1}"] if n > 1 else [])
      bar["prefix"] = " ".join(parts) + " " if parts else ""

    def progress(*args):
      return progress_lib.make(True, bar["prefix"])(*args)

    saver = None
    if checkpoints is not None:
      root, ident = checkpoints
      prefix = f"seed group {g + 1}/{len(groups)} " if len(groups) > 1 else ""
      saver = checkpoint.SweepCheckpointer(
          root / f"group_{g}", {**ident, "group": g, "members": members}, keep=exp.keep,
          every=exp.checkpoint_every, chunk_steps=first.chunk_steps,
          log=lambda line, prefix=prefix: print(prefix + line, flush=True),
          warn=lambda line, prefix=prefix: report.warning(prefix + line),
          stop_requested=signals.requested, added=config_lib.IDENTITY_ADDED)
    compile_fn = None
    if exp.compile_cache and not config.distributed:  # one store per host: not shared
      swept = sweep.swept_names(configs)
      compile_fn = compile_cache.run_executables(exp, first, built, preprocess, train, test,
                                                  dynamic_p="p" in swept)
    result = sweep.run([configs[k] for k in members], net, train, test,
                       preprocess=preprocess, compile_fn=compile_fn,
                       max_parallel=config.max_parallel, vectorize=config.vectorize,
                       progress=progress if exp.progress else None, chunk_progress=on_chunk,
                       checkpointer=saver, stop_requested=signals.requested)
    for j, k in enumerate(members):
      acc[k], curves[k] = result.acc_matrix[j], result.curves[j]
      if j in (result.diverged or {}):
        diverged[k] = result.diverged[j]
      if result.val_acc_matrix is not None:
        val_acc[k] = result.val_acc_matrix[j]
    for name, sec in result.timings.items():
      timings[name] = timings.get(name, 0.0) + sec
    layouts.append(result.layout._asdict())
  acc = np.stack(acc)
  val = None if val_acc[0] is None else np.stack(val_acc)
  res = sweep.SweepResult(configs=tuple(configs), swept=sweep.swept_names(configs),
                          acc_matrix=acc, summaries=[metrics.summarize(a) for a in acc],
                          curves=curves, timings=timings, layout=result.layout,
                          val_acc_matrix=val,
                          val_summaries=None if val is None else [metrics.summarize(a)
                                                                  for a in val],
                          diverged=diverged)
  info = dict(built.info)
  if exp.shuffle_classes:  # each seed has its own class groups: in each config's entry
    info.pop("class_groups", None)
  return res, layouts, built._replace(info={
      **info, **train_lib.benchmark_info(ds, getattr(preprocess, "stats", None))}), (
          class_groups if exp.shuffle_classes else None)


def diverged_entry(result, k: int) -> dict:
  """results.json's record of diverged config ``k``: its swept values and where it diverged."""
  cfg = result.configs[k]
  return {"index": k, **{n: getattr(cfg, n) for n in result.swept}, **result.diverged[k]}


def divergence_line(record: dict) -> str | None:
  """One line naming the diverged configs of a sweep's ``record`` (None when none did)."""
  bad = record.get("diverged") or []
  if not bad:
    return None
  swept = [n for n in record["swept"]]

  def name(d):
    return f"config {d['index']} (" + ", ".join(f"{n}={d[n]:g}" for n in swept) + ")"

  first = bad[0]["flags_message"].split(". Stopped before keeping")[0]
  return (f"{len(bad)} of {record['num_configs']} sweep configs diverged: "
          f"{', '.join(name(d) for d in bad)} (the first: {first}); the other configs' results "
          "are complete in results.json.")


def plot_average_accuracy(rows: list[dict], swept: tuple[str, ...], base, path: Path,
                          title: str) -> None:
  """Average accuracy (mean ± std over seeds) vs λ (or the first swept value), one line per
  combination of the other swept values; log x for λ/lr (linear if a value is <= 0)."""
  keys = [n for n in swept if n != "seed"]
  x_name = "lam" if ("lam" in keys or not keys) else keys[0]
  others = [n for n in keys if n != x_name]
  groups: dict = {}
  for r in rows:
    groups.setdefault(tuple(r[n] for n in others), []).append(r)
  lines = []
  for combo, members in sorted(groups.items()):
    label = ", ".join(f"{n}={v:g}" for n, v in zip(others, combo)) or None
    xs = [r.get(x_name, getattr(base, x_name)) for r in members]  # absent: not swept, one point
    lines.append((label, xs, [100 * r["average_accuracy"] for r in members],
                  [100 * r["average_accuracy_std"] for r in members]))
  log_x = x_name in ("lam", "lr") and all(x > 0 for _, xs, _, _ in lines for x in xs)
  plots.average_accuracy_sweep(lines, {"lam": "λ", "lr": "learning rate"}.get(x_name, x_name),
                               log_x, path, title)


def train_and_evaluate_sweep(config: config_lib.SweepConfig, workdir, *, writer: bool = True,
                             checkpoints: bool = True, import_seconds: float = 0.0,
                             start_time: float | None = None) -> dict | None:
  """Runs the sweep of ``config``; the record written to ``workdir/results.json`` (None when
  not ``writer``: the other processes of a multi-host sweep). ``checkpoints``: False turns the
  checkpoints off whatever ``experiment.checkpoint`` says (multi-host sweeps, not supported
  there yet)."""
  config.validate()
  exp = config.experiment
  workdir = Path(workdir)
  t0 = time.perf_counter()
  ds = train_lib.load_dataset(exp)
  exp = exp.resolved(ds.num_classes)
  config = dataclasses.replace(config, experiment=exp)
  load_seconds = time.perf_counter() - t0
  saves = None
  if exp.checkpoint and checkpoints:
    root = workdir / "checkpoints"
    train_lib.prepare_checkpoints(exp, root, "group_*/chunk_*")
    saves = (root, config.identity(f"{ds.name}:{ds.version}"))
  result, layouts, built, class_groups = run_sweep(config, ds, saves)
  if not writer:
    return None
  return write_outputs(config, result, workdir, layouts=layouts, built=built, ds=ds,
                       class_groups=class_groups,
                       extra_timings={"import": import_seconds, "load": load_seconds},
                       start_time=start_time)


def write_outputs(config: config_lib.SweepConfig, result, workdir: Path, *, layouts, built, ds,
                  extra_timings: dict, start_time: float | None = None,
                  class_groups: list | None = None) -> dict:
  """results.json, average_accuracy.png and the printed table; ``class_groups``: each config's
  (``--shuffle_classes``), written into its entry."""
  exp, base = config.experiment, config.experiment.run
  rows = sweep.table(result)
  keys = [n for n in result.swept if n != "seed"]
  timings = {**extra_timings, **result.timings}
  if start_time is not None:
    timings["total"] = time.perf_counter() - start_time
  configs = []
  for k, (cfg, acc, summ, curves) in enumerate(zip(result.configs, result.acc_matrix,
                                                    result.summaries, result.curves)):
    entry = {"index": k, **{n: getattr(cfg, n) for n in sweep.SWEEPABLE},
             "acc_matrix": acc.tolist(), **summ, "curves": curves,
             "diverged": (result.diverged or {}).get(k)}
    if class_groups is not None:
      entry["class_groups"] = class_groups[k]
    if result.val_acc_matrix is not None:
      entry["val_acc_matrix"] = result.val_acc_matrix[k].tolist()
      entry["validation"] = result.val_summaries[k]
    configs.append(entry)
  record = {
      "benchmark": {"name": exp.benchmark, "scenario": base.scenario,
                    "dataset": f"{ds.name}:{ds.version}", "num_tasks": exp.task_count,
                    "max_examples": exp.max_examples, "input_norm": exp.input_norm,
                    **built.info},
      "swept": list(result.swept),
      "values": {n: list(v) for n, v in config.values.items()},
      "num_configs": len(result.configs),
      "acc_matrix_shape": list(result.acc_matrix.shape),
      "table": rows,
      "diverged": [diverged_entry(result, k) for k in sorted(result.diverged or {})],
      "configs": configs,
      "base_config": dataclasses.asdict(base),
      "experiment": {k: v for k, v in dataclasses.asdict(exp).items() if k != "run"},
      "layout": layouts,
      "timings": timings,
      "environment": environment.environment(),
  }
  files.write_json(workdir / "results.json", record)
  title = (f"{exp.bench.title} ({base.scenario}-incremental), {base.algo}, fisher={base.fisher}, "
           f"{len(result.configs)} configs")
  if exp.plots:
    plot_average_accuracy(rows, result.swept, base, workdir / "average_accuracy.png", title)
  ranked = ("validation average accuracy" if result.val_acc_matrix is not None else
            "average accuracy (no validation split: --validation_fraction)")
  print(f"\n{title}, sorted by {ranked} (mean ± std over seeds):")
  print(sweep.format_table(rows, keys))
  if result.diverged:
    print(f"{len(result.diverged)} of {len(result.configs)} configs diverged: their results are "
          "NaN (see \"diverged\" in results.json); the others are complete")
  print("seconds: " + "  ".join(f"{k} {v:.2f}" for k, v in timings.items()))
  print(f"wrote {workdir}/results.json" + (", average_accuracy.png" if exp.plots else ""))
  return record
