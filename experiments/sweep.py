r"""Hyperparameter sweeps: every combination of the listed values, trained at once (vmapped).

    python -m experiments.sweep --benchmark=split_mnist --algo=ewc --lam=1,10,100,1000 --seeds=0,1,2
    python -m experiments.sweep --algo=ewc --lam=10,1000 --p=1,2 --lr=1e-3,3e-3 --max_parallel=4
    python -m experiments.sweep --benchmark=permuted_mnist --algo=online_ewc --gamma=0.5,0.9,1

Swept flags take comma-separated lists: --lam, --p, --lr, --gamma and --seeds (or one --seed);
the sweep is their product. Every other flag of experiments.split_mnist / permuted_mnist keeps
its meaning and is shared by all configs. All configs are trained together as one program with
a leading config axis (``jax.vmap`` of the single run; each config gives the single run's
result), sharded over all devices (``ewc_jax.sweep``); --max_parallel=N runs at most N at a time.
Permuted MNIST's permutations follow the seed, so there each seed is its own sweep (its data).

Sweeps hold out --validation_fraction=0.1 of each task's training data by default (the same
rows for every config). Writes under --workdir: results.json (every config's test and
validation accuracy matrices, metrics and curves, and the table of the swept values ranked by
validation average accuracy, mean ± std over seeds) and
average_accuracy.png (average accuracy vs λ, one line per other swept combination, seed error
bars, log x-axis).

Checkpoints as for a single run (--checkpoint, --resume, --force_restart, --checkpoint_every,
--keep): the whole batched state of every config is saved under <workdir>/checkpoints/
group_<g>/chunk_<i> (one folder per seed group and --max_parallel chunk) after each task and
every --checkpoint_every steps; re-running the same command resumes every config bit for bit.
The checkpoints' identity is the swept grid, the shared flags and the layout (chunks, devices):
anything else is refused naming the keys. The workdir is locked for the run; SIGINT/SIGTERM
save the position and exit 130/143. With --distributed, sweeps are not checkpointed (yet).
"""

from __future__ import annotations

import time

_START = time.perf_counter()

# pylint: disable=wrong-import-position
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from ewc_jax import interrupt  # noqa: E402
from experiments import cli  # noqa: E402
from experiments import lock  # noqa: E402

BENCHMARKS = {
    "split_mnist": cli.Benchmark(name="split_mnist", title="Split MNIST", max_tasks=5,
                                 default_tasks=5),
    "permuted_mnist": cli.Benchmark(name="permuted_mnist", title="Permuted MNIST",
                                    max_tasks=None, default_tasks=10),
}
SWEPT_FLAGS = ("lam", "p", "gamma", "lr")

FLAGS = flags.FLAGS
cli.define_flags(cli.Benchmark(name="sweep", title="Sweep", max_tasks=None, default_tasks=5))
_defaults = {name: FLAGS[name].default for name in SWEPT_FLAGS}
_helps = {name: FLAGS[name].help for name in SWEPT_FLAGS}
for _name in SWEPT_FLAGS:  # the single-run float flags become lists
  delattr(FLAGS, _name)
  flags.DEFINE_list(_name, None if _defaults[_name] is None else [f"{_defaults[_name]:g}"],
                    _helps[_name] + " A comma-separated list sweeps it.")
FLAGS.set_default("validation_fraction", 0.1)  # sweeps rank configs on a validation split
flags.DEFINE_enum("benchmark", "split_mnist", list(BENCHMARKS), "Task sequence.")
flags.DEFINE_integer("max_parallel", None, "Train at most N configs at a time (padding to a "
                     "multiple of the devices included); default: all at once.")
flags.DEFINE_bool("distributed", False, "Multi-host: call jax.distributed.initialize() first "
                  "(one process per host, all with the same flags); the config axis is then "
                  "sharded over every device of every host. Process 0 writes the outputs.")
flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0 "
                    "(default: auto-detected by JAX on managed clusters).")
flags.DEFINE_integer("num_processes", None, "With --distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")


def _parse_floats(name: str, default: float) -> tuple[float, ...]:
  if FLAGS[name].value is None:  # not given: the benchmark's default
    return (float(default),)
  raw = FLAGS[name].value
  try:
    values = tuple(float(v) for v in raw)
  except ValueError as err:
    raise ValueError(f"--{name}={','.join(raw)} is invalid: expected numbers separated by "
                     "commas.") from err
  if not values:
    raise ValueError(f"--{name}= is invalid: expected at least one number.")
  if len(set(values)) != len(values):
    raise ValueError(f"--{name}={','.join(raw)} is invalid: expected distinct values.")
  return values


def configs_from_flags(bench: cli.Benchmark):
  """``(base config, {name: values}, [configs])``; raises ValueError naming the bad flag."""
  from ewc_jax import sweep  # pylint: disable=import-outside-toplevel
  # The swept flags are lists: read apart, then set per config.
  defaults = cli.config_from_flags(bench.name, lists=SWEPT_FLAGS)
  values = {name: _parse_floats(name, getattr(defaults, name)) for name in SWEPT_FLAGS}
  base = dataclasses.replace(defaults, **{name: vals[0] for name, vals in values.items()})
  values["seed"] = cli.seeds_from_flags(base)
  if FLAGS.max_parallel is not None and FLAGS.max_parallel < 1:
    raise ValueError(f"--max_parallel={FLAGS.max_parallel} is invalid: expected an integer >= 1.")
  configs = sweep.grid(base, **values)
  sweep.validate(configs)  # every value of every swept flag
  return base, values, configs


def checkpoint_identity(bench: cli.Benchmark, base, values: dict, ds, num_tasks: int,
                        max_examples: int | None) -> dict:
  """What the sweep's checkpoints must come from: the grid and every shared flag."""
  return {"benchmark": bench.name, "dataset": f"{ds.name}:{ds.version}", "num_tasks": num_tasks,
          "max_examples": max_examples, "input_norm": FLAGS.input_norm,
          "values": {n: list(v) for n, v in values.items()},
          "base_config": dataclasses.asdict(base), "max_parallel": FLAGS.max_parallel}


def prepare_checkpoints(root: Path) -> None:
  """--force_restart discards them; --noresume refuses existing ones (the configs are checked
  chunk by chunk by ewc_jax.sweep.run, before anything is trained)."""
  from ewc_jax import checkpoint  # pylint: disable=import-outside-toplevel
  if FLAGS.force_restart:
    if checkpoint.discard(root):
      print(f"--force_restart: discarded the checkpoints in {root}")
    return
  if checkpoint.checkpoint_dirs(root, "group_*/chunk_*") and not FLAGS.resume:
    raise checkpoint.CheckpointError(
        f"--noresume: {root} already holds checkpoints; pass --resume to continue them or "
        "--force_restart to discard them and start over.")


def run_sweep(bench: cli.Benchmark, configs, ds, num_tasks: int, max_examples: int | None,
              checkpoints: tuple[Path, dict] | None = None):
  """Runs the sweep (one per seed for Permuted MNIST: the data follow the seed).

  ``checkpoints``: ``(root folder, identity)``: group g checkpoints under ``root/group_<g>``.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ewc_jax import heads as heads_lib  # pylint: disable=import-outside-toplevel
  from ewc_jax import sweep  # pylint: disable=import-outside-toplevel
  from experiments import tasks  # pylint: disable=import-outside-toplevel

  data_seed = (lambda c: c.seed) if bench.name == "permuted_mnist" else (lambda c: None)
  groups: dict = {}
  for k, cfg in enumerate(configs):
    groups.setdefault(data_seed(cfg), []).append(k)
  acc = [None] * len(configs)
  val_acc = [None] * len(configs)
  curves = [None] * len(configs)
  timings: dict = {"data": 0.0}
  layouts, built = [], None
  for g, members in enumerate(groups.values()):
    first = configs[members[0]]
    t0 = time.perf_counter()
    built = cli.build_tasks(bench, ds, first, num_tasks, max_examples)
    train, test = tasks.to_device(built.train), tasks.to_device(built.test)
    timings["data"] += time.perf_counter() - t0
    smallest = int(np.min(built.train.counts))
    if first.batch_size > smallest:
      raise ValueError(f"--batch_size={first.batch_size} is invalid: expected at most "
                       f"{smallest}, the number of training examples of the smallest task.")
    net = heads_lib.make_network(first.scenario, built.class_groups, first.hidden)
    bar = {"prefix": ""}

    def on_chunk(i, n, idx, g=g, members=members):
      parts = ([f"seed group {g + 1}/{len(groups)}"] if len(groups) > 1 else []) + (
          [f"configs {members[idx.start] + 1}-{members[idx.stop - 1] + 1}"] if n > 1 else [])
      bar["prefix"] = " ".join(parts) + " " if parts else ""

    def progress(*args):
      return cli.make_progress(True, bar["prefix"])(*args)

    saver = None
    if checkpoints is not None:
      from ewc_jax import checkpoint  # pylint: disable=import-outside-toplevel
      root, ident = checkpoints
      prefix = f"seed group {g + 1}/{len(groups)} " if len(groups) > 1 else ""
      saver = checkpoint.SweepCheckpointer(
          root / f"group_{g}", {**ident, "group": g, "members": members}, keep=FLAGS.keep,
          every=FLAGS.checkpoint_every, chunk_steps=first.chunk_steps,
          log=lambda line, prefix=prefix: print(prefix + line, flush=True))
    result = sweep.run([configs[k] for k in members], net, train, test,
                       preprocess=cli.preprocess_from_flags(), max_parallel=FLAGS.max_parallel,
                       progress=progress if FLAGS.progress else None, chunk_progress=on_chunk,
                       checkpointer=saver)
    for j, k in enumerate(members):
      acc[k], curves[k] = result.acc_matrix[j], result.curves[j]
      if result.val_acc_matrix is not None:
        val_acc[k] = result.val_acc_matrix[j]
    for name, sec in result.timings.items():
      timings[name] = timings.get(name, 0.0) + sec
    layouts.append(result.layout._asdict())
  acc = np.stack(acc)
  val = None if val_acc[0] is None else np.stack(val_acc)
  from ewc_jax import metrics  # pylint: disable=import-outside-toplevel
  res = sweep.SweepResult(configs=tuple(configs), swept=sweep.swept_names(configs),
                          acc_matrix=acc, summaries=[metrics.summarize(a) for a in acc],
                          curves=curves, timings=timings, layout=result.layout,
                          val_acc_matrix=val,
                          val_summaries=None if val is None else [metrics.summarize(a)
                                                                  for a in val])
  return res, layouts, built


def plot_average_accuracy(rows: list[dict], swept: tuple[str, ...], base, path: Path,
                          title: str) -> None:
  """Average accuracy (mean ± std over seeds) vs λ (or the first swept value), one line per
  combination of the other swept values; log x for λ/lr (linear if a value is <= 0)."""
  from experiments import plots  # pylint: disable=import-outside-toplevel
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


def main(argv):
  del argv
  import_seconds = time.perf_counter() - _START
  cli.quiet_logging()
  import jax  # pylint: disable=import-outside-toplevel
  with cli.user_errors(), interrupt.catch(), contextlib.ExitStack() as held:
    bench = BENCHMARKS[FLAGS.benchmark]
    if not FLAGS["num_tasks"].present:
      FLAGS.num_tasks = bench.default_tasks
    base, values, configs = configs_from_flags(bench)
    cli.preprocess_from_flags()  # --input_norm checked before anything runs
    num_tasks, max_examples = cli.check_subset_flags(bench)
    cli.check_checkpoint_flags()
    use_checkpoints = FLAGS.checkpoint
    if FLAGS.distributed and FLAGS.checkpoint:
      if FLAGS["checkpoint"].present:
        raise ValueError("--checkpoint is not supported with --distributed (yet): pass "
                         "--nocheckpoint.")
      use_checkpoints = False
    if FLAGS.distributed:
      jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                 num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    writer = jax.process_index() == 0
    workdir = cli.check_workdir(FLAGS.workdir) if writer else Path(FLAGS.workdir)
    if writer:  # the whole run: another run on this workdir exits 2 at once
      held.enter_context(lock.hold(workdir))
    if FLAGS.compile_cache:
      cli.enable_compile_cache()
    t0 = time.perf_counter()
    ds = cli.load_dataset()
    load_seconds = time.perf_counter() - t0
    checkpoints = None
    if use_checkpoints:
      prepare_checkpoints(workdir / "checkpoints")
      checkpoints = (workdir / "checkpoints",
                     checkpoint_identity(bench, base, values, ds, num_tasks, max_examples))
    result, layouts, built = run_sweep(bench, configs, ds, num_tasks, max_examples,
                                       checkpoints)
    if not writer:
      return
    write_outputs(bench, base, values, result, layouts, built, ds, workdir,
                  {"import": import_seconds, "load": load_seconds})


def write_outputs(bench, base, values, result, layouts, built, ds, workdir: Path,
                  extra_timings: dict) -> dict:
  from ewc_jax import sweep  # pylint: disable=import-outside-toplevel
  rows = sweep.table(result)
  keys = [n for n in result.swept if n != "seed"]
  timings = {**extra_timings, **result.timings, "total": time.perf_counter() - _START}
  configs = []
  for k, (cfg, acc, summ, curves) in enumerate(zip(result.configs, result.acc_matrix,
                                                    result.summaries, result.curves)):
    entry = {"index": k, **{n: getattr(cfg, n) for n in sweep.SWEEPABLE},
             "acc_matrix": acc.tolist(), **summ, "curves": curves}
    if result.val_acc_matrix is not None:
      entry["val_acc_matrix"] = result.val_acc_matrix[k].tolist()
      entry["validation"] = result.val_summaries[k]
    configs.append(entry)
  record = {
      "benchmark": {"name": bench.name, "scenario": base.scenario,
                    "dataset": f"{ds.name}:{ds.version}", "num_tasks": int(FLAGS.num_tasks),
                    "max_examples": FLAGS.max_examples, "input_norm": FLAGS.input_norm,
                    **built.info},
      "swept": list(result.swept),
      "values": {n: list(v) for n, v in values.items()},
      "num_configs": len(result.configs),
      "acc_matrix_shape": list(result.acc_matrix.shape),
      "table": rows,
      "configs": configs,
      "base_config": dataclasses.asdict(base),
      "layout": layouts,
      "timings": timings,
      "environment": cli.environment(),
  }
  cli.write_json_atomic(workdir / "results.json", record)
  title = (f"{bench.title} ({base.scenario}-incremental), {base.algo}, fisher={base.fisher}, "
           f"{len(result.configs)} configs")
  if FLAGS.plots:
    plot_average_accuracy(rows, result.swept, base, workdir / "average_accuracy.png", title)
  ranked = ("validation average accuracy" if result.val_acc_matrix is not None else
            "average accuracy (no validation split: --validation_fraction)")
  print(f"\n{title}, sorted by {ranked} (mean ± std over seeds):")
  print(sweep.format_table(rows, keys))
  print("seconds: " + "  ".join(f"{k} {v:.2f}" for k, v in timings.items()))
  print(f"wrote {workdir}/results.json" + (", average_accuracy.png" if FLAGS.plots else ""))
  return record


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
