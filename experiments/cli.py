"""What every experiment CLI shares: flags -> Config, the run, the printed table and the outputs.

Thin by design (like flax/examples/mnist): ``main`` parses flags into a plain
:class:`ewc_jax.continual.Config` and calls :func:`train_and_evaluate`. User errors (bad flag
values, missing data, an unwritable workdir) print one line naming the flag and exit with status
2, writing nothing.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from absl import flags

from ewc_jax import algorithms
from ewc_jax import checkpoint
from ewc_jax import continual
from ewc_jax import errors
from ewc_jax import fisher as fisher_lib
from ewc_jax import heads as heads_lib
from ewc_jax import interrupt
from experiments import defaults
from experiments import files
from experiments import lock

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """What differs between the experiment scripts."""
  name: str                 # "split_mnist" | "permuted_mnist"
  title: str
  max_tasks: int | None     # None: any number
  default_tasks: int


# Flags whose default depends on the benchmark and scenario (experiments/defaults.py).
PER_BENCHMARK = ("lam", "lr", "epochs", "steps_per_task", "hidden", "reset_optimizer",
                 "batch_size", "fisher")
_PER = " Default: per benchmark and scenario (README, 'Defaults and how they were chosen')."


def define_flags(bench: Benchmark) -> None:
  """Defines the flags shared by every benchmark; those of :data:`PER_BENCHMARK` default to
  None, i.e. the value of experiments/defaults.py for the run's benchmark and scenario."""
  d = continual.Config()
  flags.DEFINE_string("algo", d.algo, f"Algorithm: {'|'.join(algorithms.NAMES)}.")
  flags.DEFINE_string("scenario", None,
                      "task (a head per task, task id known) | domain (one shared head) | "
                      "class (one head over all classes seen so far). Default: task for Split "
                      "MNIST, domain for Permuted MNIST.")
  flags.DEFINE_string("consolidate", None,
                      "What EWC consolidates: shared (the backbone and every head used by more "
                      "than one task: domain-IL's shared head, class-IL's single head; task-IL's "
                      "per-task heads stay free) | backbone | all. Default: shared, or backbone "
                      "for --penalty=seed|clarena (the reference's behaviour).")
  flags.DEFINE_string("penalty", d.penalty,
                      "EWC penalty (with --algo=ewc): standard = (lam/2)*sum F|theta-theta*|^p "
                      "(Kirkpatrick 2017); seed = the seed reference's per-tensor p-norm / task "
                      "id; clarena = CLArena 1.1.0's 0.5*lam*sum F (theta-theta*)^2.")
  flags.DEFINE_float("lam", None, "Regularisation strength lambda (> 0). Convention: the loss "
                     "adds (lam/2) * sum_k sum_i F_ki |theta_i - theta*_ki|^p, with F the mean "
                     "per-example Fisher (no 1/num_params)." + _PER)
  flags.DEFINE_float("p", d.p, "Exponent p of |theta - theta*| (> 0).")
  flags.DEFINE_float("gamma", d.gamma, "Online EWC decay of the accumulated importance, (0, 1].")
  flags.DEFINE_string("fisher", None,
                      f"Importance estimator: {'|'.join(fisher_lib.KINDS)}." + _PER)
  flags.DEFINE_integer("fisher_batch_size", d.fisher_batch_size,
                       "Examples per Fisher scan step (changes the result only for batch_squared).")
  flags.DEFINE_bool("fisher_normalize", d.fisher_normalize,
                    "Divide the importance by the number of backbone parameters (seed parity).")
  flags.DEFINE_integer("epochs", None, "Training length per task in epochs (>= 1); exclusive "
                       "with --steps_per_task." + _PER)
  flags.DEFINE_integer("steps_per_task", None, "Training length per task in iterations (>= 1; "
                       "van de Ven & Tolias count iterations); exclusive with --epochs." + _PER)
  flags.DEFINE_bool("reset_optimizer", None, "Restart the optimizer at every task (as CLArena "
                    "and Avalanche); --noreset_optimizer keeps its state across tasks (as Hsu "
                    "et al. 2018 and van de Ven & Tolias 2019)." + _PER)
  flags.DEFINE_integer("batch_size", None, "Training batch size (>= 1)." + _PER)
  flags.DEFINE_string("optimizer", d.optimizer, "adam | sgd (plain SGD, no momentum: "
                      "Avalanche's baseline); --lr is its learning rate.")
  flags.DEFINE_float("lr", None, "Learning rate of --optimizer (> 0)." + _PER)
  flags.DEFINE_list("hidden", None, "Backbone MLP layer widths." + _PER)
  flags.DEFINE_string("input_norm", "none", "Input scaling: none (pixels / 255, in [0, 1]) | "
                      "mnist ((pixels / 255 - 0.1307) / 0.3081: torchvision's MNIST "
                      "normalisation, as in Avalanche's benchmarks).")
  flags.DEFINE_float("validation_fraction", d.validation_fraction,
                     "Hold out this fraction of each task's training data as a validation "
                     "split, scored like the test set (results.json: val_acc_matrix), in [0, 1); "
                     "0: none. The held-out rows depend on --validation_seed only.")
  flags.DEFINE_integer("validation_seed", d.validation_seed,
                       "Which rows the validation split holds out (the same for every --seed).")
  flags.DEFINE_integer("seed", d.seed, "PRNG seed: initialisation, shuffling, permutations, "
                       "sampled labels.")
  flags.DEFINE_list("seeds", None, "Several seeds (e.g. 0,1,2): one run each, mean ± std.")
  flags.DEFINE_string("dataset", "mnist", "Any TFDS 28x28 10-class image dataset "
                      "(mnist, fashion_mnist, kmnist, ...).")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: $TFDS_DATA_DIR, else "
                      "../shared/tensorflow_datasets when present, else TFDS's default).")
  flags.DEFINE_string("manual_dir", None, "Folder with the raw dataset files, to prepare the "
                      "dataset offline when data_dir does not hold it (needs tensorflow-cpu).")
  flags.DEFINE_string("workdir", f"runs/{bench.name}", "Where the outputs are written.")
  flags.DEFINE_integer("num_tasks", bench.default_tasks, "Number of tasks"
                       + (f" (at most {bench.max_tasks})." if bench.max_tasks else "."))
  flags.DEFINE_integer("max_examples", None, "Keep at most N train and N test examples per task "
                       "(quick checks; default: all).")
  flags.DEFINE_bool("plots", True, "Write the PNG plots.")
  flags.DEFINE_bool("progress", True, "Show a progress bar per task.")
  flags.DEFINE_bool("tensorboard", False, "Write TensorBoard scalars while training (per epoch: "
                    "train loss parts and accuracy; per task: test accuracy of every task seen, "
                    "average accuracy, validation average accuracy) under "
                    "<workdir>/tensorboard/seed_<s>.")
  flags.DEFINE_bool("compile_cache", True, "Use JAX's persistent compilation cache.")
  flags.DEFINE_bool("debug", False, "Show full tracebacks for user errors.")
  flags.DEFINE_bool("checkpoint", True, "Save the run state after every task (and every "
                    "--checkpoint_every steps) under <workdir>/checkpoints, and resume from it. "
                    "--nocheckpoint: no saves, no resume (no orbax import either).")
  flags.DEFINE_bool("resume", True, "Continue from the newest complete checkpoint in "
                    "<workdir>/checkpoints when there is one (re-running the same command does "
                    "this); --noresume refuses to run over existing checkpoints.")
  flags.DEFINE_bool("force_restart", False, "Discard the checkpoints in <workdir>/checkpoints "
                    "and start over (also when they come from another configuration).")
  flags.DEFINE_integer("checkpoint_every", 0, "Also checkpoint within a task every N train "
                       "steps (rounded up to whole chunks, see --chunk_steps); 0: only after "
                       "each task.")
  flags.DEFINE_integer("chunk_steps", d.chunk_steps, "Train steps per compiled chunk (a "
                       "lax.scan): the progress bar, --checkpoint_every and the NaN check act "
                       "between chunks. Does not change the results.")
  flags.DEFINE_integer("keep", 2, "Number of newest checkpoints kept (>= 1).")


def parse_flags(argv):
  """``app.run`` flags parser: an unknown flag or unparsable value gives one line and status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as err:
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    sys.exit(2)


def check_checkpoint_flags() -> None:
  if FLAGS.keep is None or FLAGS.keep < 1:
    raise ValueError(f"--keep={FLAGS.keep} is invalid: expected an integer >= 1.")
  if FLAGS.checkpoint_every is None or FLAGS.checkpoint_every < 0:
    raise ValueError(f"--checkpoint_every={FLAGS.checkpoint_every} is invalid: expected an "
                     "integer >= 0 (0: only after each task).")


def prepare_checkpoints(root: Path, identity: dict) -> None:
  """--force_restart discards old checkpoints; otherwise they must come from this config."""
  if FLAGS.force_restart:
    if checkpoint.discard(root):
      print(f"--force_restart: discarded the checkpoints in {root}")
    return
  existing = checkpoint.checkpoint_dirs(root)
  if existing and not FLAGS.resume:
    raise checkpoint.CheckpointError(
        f"--noresume: {root} already holds checkpoints; pass --resume to continue them or "
        "--force_restart to discard them and start over.")
  for folder in existing:
    with checkpoint.RunCheckpointer(folder, identity) as ckpt:
      ckpt.check_config()


def _parse_ints(name: str, values) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in values)
  except (TypeError, ValueError) as err:
    raise ValueError(f"--{name}={','.join(map(str, values))} is invalid: expected integers "
                     "separated by commas.") from err


def config_from_flags(benchmark: str, lists: tuple[str, ...] = ()) -> continual.Config:
  """The run's config: the flags set on the command line, else the defaults of ``benchmark``
  and the scenario (experiments/defaults.py), else :class:`continual.Config`'s.

  ``lists``: flags holding lists of values (a sweep's), not read here: the config gets their
  defaults."""
  scenario = FLAGS.scenario if FLAGS.scenario is not None else defaults.SCENARIO[benchmark]
  table = defaults.for_run(benchmark, scenario)
  if FLAGS["epochs"].present and FLAGS["steps_per_task"].present:
    raise ValueError(f"--epochs={FLAGS.epochs} and --steps_per_task={FLAGS.steps_per_task} are "
                     "exclusive: give the training length per task in epochs or in iterations.")
  if FLAGS["epochs"].present or FLAGS["steps_per_task"].present:
    table.pop("epochs", None)
    table.pop("steps_per_task", None)
  fields = {name: table[name] for name in PER_BENCHMARK if name in table}
  for name in PER_BENCHMARK:
    if FLAGS[name].value is not None and name not in lists:
      fields[name] = FLAGS[name].value
  if "steps_per_task" in fields and "epochs" not in fields:
    fields["epochs"] = None
  if "hidden" in fields:
    fields["hidden"] = _parse_ints("hidden", fields["hidden"])
  penalty = FLAGS.penalty
  return continual.Config(
      algo=FLAGS.algo, scenario=scenario, penalty=penalty,
      consolidate=(FLAGS.consolidate if FLAGS.consolidate is not None else
                   continual.Config(penalty=penalty).consolidated),
      **{name: FLAGS[name].value for name in ("p", "gamma") if name not in lists},
      fisher_batch_size=FLAGS.fisher_batch_size,
      fisher_normalize=FLAGS.fisher_normalize, seed=FLAGS.seed, optimizer=FLAGS.optimizer,
      validation_fraction=FLAGS.validation_fraction, validation_seed=FLAGS.validation_seed,
      chunk_steps=FLAGS.chunk_steps, **fields)


def seeds_from_flags(config: continual.Config) -> tuple[int, ...]:
  if not FLAGS.seeds:
    return (config.seed,)
  seeds = _parse_ints("seeds", FLAGS.seeds)
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds={','.join(FLAGS.seeds)} is invalid: expected distinct seeds.")
  return seeds


def check_subset_flags(bench: Benchmark) -> tuple[int, int | None]:
  """Validated ``(--num_tasks, --max_examples)``."""
  n = FLAGS.num_tasks
  if n is None or n < 1 or (bench.max_tasks is not None and n > bench.max_tasks):
    allowed = f"1..{bench.max_tasks}" if bench.max_tasks else ">= 1"
    raise ValueError(f"--num_tasks={n} is invalid: expected an integer in {allowed}.")
  if FLAGS.max_examples is not None and FLAGS.max_examples < 1:
    raise ValueError(f"--max_examples={FLAGS.max_examples} is invalid: expected an integer >= 1.")
  return n, FLAGS.max_examples


def enable_compile_cache() -> Path:
  """Turns on JAX's persistent compilation cache (a second run compiles nothing)."""
  import jax  # pylint: disable=import-outside-toplevel
  from experiments import data  # pylint: disable=import-outside-toplevel
  path = data.default_cache_dir() / "xla"
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def check_workdir(workdir: str) -> Path:
  """Creates ``workdir`` and checks it is writable, before any work is done."""
  path = Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_"):
      pass
  except OSError as err:
    raise ValueError(f"--workdir={workdir!r} is not a writable directory ({err.strerror}).") from err
  return path


def write_atomic(path: Path, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically (see :mod:`experiments.files`)."""
  files.write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: Path, obj) -> None:
  write_atomic(path, json.dumps(obj, indent=2) + "\n")


def format_matrix(acc_matrix, std=None) -> str:
  """The accuracy matrix as a text table (rows: after training task i; columns: task j)."""
  t = len(acc_matrix)
  width = 14 if std is not None else 8
  head = "after \\ on " + "".join(f"{'T' + str(j + 1):>{width}}" for j in range(t)) + f"{'mean':>8}"
  lines = [head, "-" * len(head)]
  for i, row in enumerate(acc_matrix):
    seen = row[:i + 1]
    cells = (f"{100 * v:8.2f}" if std is None else f"{100 * v:8.2f}±{100 * std[i][j]:<5.2f}"
             for j, v in enumerate(row))
    lines.append(f"{'T' + str(i + 1):<11}" + "".join(cells) + f"{100 * sum(seen) / len(seen):8.2f}")
  return "\n".join(lines)


def matrix_csv(acc_matrix) -> str:
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(["after_task"] + [f"task_{j + 1}" for j in range(len(acc_matrix))])
  for i, row in enumerate(acc_matrix):
    writer.writerow([i + 1] + [f"{v:.6f}" for v in row])
  return out.getvalue()


def environment() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import ewc_jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return {"ewc_jax": ewc_jax.__version__, "python": platform.python_version(),
          "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "backend": jax.default_backend(),
          "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
          "num_devices": jax.device_count(), "platform": platform.platform()}


def make_progress(enabled: bool, prefix: str = "") -> Callable | None:
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  def progress(task_index: int, total: int, done: int = 0):
    return tqdm(total=total, initial=done, desc=f"{prefix}task {task_index + 1}", unit="step",
                leave=True, dynamic_ncols=True, file=sys.stderr)
  return progress


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_normalize(x):
  """uint8 images -> ``(x / 255 - 0.1307) / 0.3081`` float32, flattened to ``[B, H*W*C]``."""
  from ewc_jax import train  # pylint: disable=import-outside-toplevel
  return (train.scale_pixels(x) - MNIST_MEAN) / MNIST_STD


def preprocess_from_flags() -> Callable:
  """The model-input function of ``--input_norm``."""
  from ewc_jax import train  # pylint: disable=import-outside-toplevel
  choices = {"none": train.scale_pixels, "mnist": mnist_normalize}
  if FLAGS.input_norm not in choices:
    raise ValueError(f"--input_norm={FLAGS.input_norm!r} is invalid: expected one of "
                     f"{', '.join(choices)}.")
  return choices[FLAGS.input_norm]


def build_tasks(bench: Benchmark, ds, config: continual.Config, num_tasks: int,
                max_examples: int | None):
  import jax  # pylint: disable=import-outside-toplevel
  from experiments import protocols  # pylint: disable=import-outside-toplevel
  if bench.name == "split_mnist":
    return protocols.split(ds, config.scenario, num_tasks, max_examples)
  key = jax.random.fold_in(jax.random.key(config.seed), 0x5EED)  # permutations follow the seed
  return protocols.permuted(ds, config.scenario, num_tasks, max_examples, key)


def load_dataset():
  """The --dataset from --data_dir / --manual_dir, checked to be 28x28 with 10 classes."""
  from experiments import data  # pylint: disable=import-outside-toplevel
  if (FLAGS.data_dir and not os.path.isdir(FLAGS.data_dir) and FLAGS.manual_dir is None
      and importlib.util.find_spec("tensorflow") is None):  # nothing could prepare it there
    raise ValueError(f"--data_dir={FLAGS.data_dir!r} is not an existing folder: expected a "
                     "TFDS data folder holding the prepared dataset (see `make prepare-data`).")
  ds = data.load_dataset(FLAGS.dataset, data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir)
  if ds.train_images.shape[1:3] != (28, 28) or int(ds.train_labels.max()) != 9:
    raise ValueError(f"--dataset={FLAGS.dataset!r} is invalid: expected a 28x28 image dataset "
                     f"with 10 classes, got images {ds.train_images.shape[1:]} and "
                     f"{int(ds.train_labels.max()) + 1} classes.")
  return ds


def train_and_evaluate(bench: Benchmark, config: continual.Config, workdir: Path, *,
                       seeds: tuple[int, ...], import_seconds: float = 0.0,
                       start_time: float | None = None) -> dict:
  """Loads data, runs every seed, prints the accuracy matrix, writes results.json, CSV, PNGs.

  The checkpointers are closed last, so the newest background save overlaps the writing of the
  results; ``timings["checkpoint"]`` counts the waiting for saves up to then.
  """
  subset = check_subset_flags(bench)
  t0 = time.perf_counter()
  ds = load_dataset()
  load_seconds = time.perf_counter() - t0
  with contextlib.ExitStack() as savers:
    return _train_and_evaluate(bench, config, workdir, seeds, import_seconds, start_time, ds,
                               load_seconds, subset, savers)


def _train_and_evaluate(bench, config, workdir, seeds, import_seconds, start_time, ds,
                        load_seconds, subset: tuple[int, int | None],
                        savers: contextlib.ExitStack) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ewc_jax import metrics  # pylint: disable=import-outside-toplevel
  from experiments import tasks  # pylint: disable=import-outside-toplevel

  num_tasks, max_examples = subset
  preprocess = preprocess_from_flags()
  if FLAGS.plots:  # matplotlib's import overlaps the training
    from experiments import plots  # pylint: disable=import-outside-toplevel
    plots.prefetch()
  runs = []
  for seed in seeds:
    cfg = dataclasses.replace(config, seed=seed)
    t0 = time.perf_counter()
    built = build_tasks(bench, ds, cfg, num_tasks, max_examples)
    train, test = tasks.to_device(built.train), tasks.to_device(built.test)
    data_seconds = load_seconds + time.perf_counter() - t0
    if not runs:  # checks and checkpoint preparation, before anything is trained or written
      counts = np.asarray(built.train.counts)
      if config.batch_size > int(counts.min()):
        raise ValueError(
            f"--batch_size={config.batch_size} is invalid: expected at most {int(counts.min())}, "
            f"the number of training examples of the smallest task (task "
            f"{int(counts.argmin()) + 1}).")
      identity = {"benchmark": bench.name, "dataset": f"{ds.name}:{ds.version}",
                  "num_tasks": num_tasks, "max_examples": max_examples, "seeds": list(seeds),
                  "input_norm": FLAGS.input_norm, **dataclasses.asdict(config)}
      if FLAGS.checkpoint:
        prepare_checkpoints(workdir / "checkpoints", identity)
    net = heads_lib.make_network(cfg.scenario, built.class_groups, cfg.hidden)
    prefix = f"seed {seed} " if len(seeds) > 1 else ""
    ckpt = savers.enter_context(checkpoint.RunCheckpointer(
        workdir / "checkpoints" / f"seed_{seed}", identity, keep=FLAGS.keep,
        every=FLAGS.checkpoint_every, chunk_steps=cfg.chunk_steps)) if FLAGS.checkpoint else None
    resume = (ckpt.restore(lambda: checkpoint.abstract_run_state(cfg, net, train,
                                                                 preprocess=preprocess))
              if ckpt is not None else None)
    resumed_from = None
    if resume is not None:
      resumed_from = str(ckpt.step_path(ckpt.latest_step()))
      where = checkpoint.describe_position(resume, cfg, np.asarray(train.counts))
      print(f"{prefix}resuming from {resumed_from} ({where})", flush=True)
    hook = ckpt if ckpt is not None else interrupt.check
    if FLAGS.tensorboard:  # scalars first: an interrupt raised by the checkpointer keeps them
      from experiments import tensorboard  # pylint: disable=import-outside-toplevel
      logger = tensorboard.ScalarLogger(workdir / "tensorboard" / f"seed_{seed}", start=resume)
      savers.callback(logger.close)
      hook = tensorboard.chain(logger, hook)
    result = continual.run(cfg, net, train, test, preprocess=preprocess, resume=resume,
                           on_checkpoint=hook,
                           progress=make_progress(FLAGS.progress, prefix))
    timings = {"import": import_seconds, "data": data_seconds, **result.timings,
               "checkpoint": ckpt.save_seconds if ckpt is not None else 0.0}
    entry = {"seed": seed, "resumed_from": resumed_from,
             "acc_matrix": [[float(v) for v in row] for row in result.acc_matrix],
             **metrics.summarize(result.acc_matrix), "curves": result.curves,
             "timings": timings}
    if result.val_acc_matrix is not None:
      entry["val_acc_matrix"] = np.asarray(result.val_acc_matrix).tolist()
      entry["validation"] = metrics.summarize(result.val_acc_matrix)
    runs.append(entry)
    load_seconds, import_seconds = 0.0, 0.0

  mats = np.array([r["acc_matrix"] for r in runs])
  mean, std = mats.mean(0), mats.std(0)
  summary = metrics.summarize(mean)
  per_seed = {k: [r[k] for r in runs] for k in ("average_accuracy", "bwt", "mean_forgetting")}
  timings = {k: float(sum(r["timings"][k] for r in runs)) for k in runs[0]["timings"]}
  timings["data_from_cache"] = bool(ds.from_cache)
  if start_time is not None:
    timings["total"] = time.perf_counter() - start_time
  record = {
      "benchmark": {"name": bench.name, "scenario": config.scenario,
                    "dataset": f"{ds.name}:{ds.version}", "num_tasks": num_tasks,
                    "max_examples": max_examples, "input_norm": FLAGS.input_norm,
                    **built.info},
      "acc_matrix": mean.tolist(),
      "acc_matrix_std": std.tolist(),
      **summary,
      **({} if "val_acc_matrix" not in runs[0] else {
          "val_acc_matrix": np.mean([r["val_acc_matrix"] for r in runs], 0).tolist(),
          "validation": metrics.summarize(np.mean([r["val_acc_matrix"] for r in runs], 0))}),
      "seeds": list(seeds),
      "average_accuracy_mean": float(np.mean(per_seed["average_accuracy"])),
      "average_accuracy_std": float(np.std(per_seed["average_accuracy"])),
      "bwt_mean": float(np.mean(per_seed["bwt"])),
      "bwt_std": float(np.std(per_seed["bwt"])),
      "curves": runs[0]["curves"] if len(runs) == 1 else [r["curves"] for r in runs],
      "runs": runs,
      "config": dataclasses.asdict(config),
      "timings": timings,
      "environment": environment(),
  }
  write_json_atomic(workdir / "results.json", record)
  write_atomic(workdir / "acc_matrix.csv", matrix_csv(mean))
  title = (f"{bench.title} ({config.scenario}-incremental), {config.algo}, "
           f"λ={config.lam:g}, fisher={config.fisher}, seeds={','.join(map(str, seeds))}")
  if FLAGS.plots:
    from experiments import plots  # pylint: disable=import-outside-toplevel
    plots.accuracy_heatmap(mean, workdir / "acc_matrix.png", title)
    plots.accuracy_over_training(mean, std if len(runs) > 1 else None,
                                 workdir / "accuracy_over_training.png", title)

  print(f"\n{title}")
  print(format_matrix(mean.tolist(), std.tolist() if len(runs) > 1 else None))
  aa = 100 * np.array(per_seed["average_accuracy"])
  bwt = 100 * np.array(per_seed["bwt"])
  print(f"average accuracy {aa.mean():.2f} ± {aa.std():.2f}  BWT {bwt.mean():+.2f} ± "
        f"{bwt.std():.2f}  mean forgetting {100 * summary['mean_forgetting']:.2f}"
        + (f"  ({len(seeds)} seeds)" if len(seeds) > 1 else ""))
  if "validation" in record:
    print(f"validation split ({100 * config.validation_fraction:g}% of each task's training "
          f"data): average accuracy {100 * record['validation']['average_accuracy']:.2f}")
  print("seconds: " + "  ".join(f"{k} {v:.2f}" for k, v in timings.items()
                                if isinstance(v, float)))
  print(f"wrote {workdir}/results.json, acc_matrix.csv" + (", *.png" if FLAGS.plots else ""))
  return record


def quiet_logging() -> None:
  """No INFO lines from TFDS/orbax unless --verbosity or --debug asks for them."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  if not FLAGS["verbosity"].present and not FLAGS.debug:
    absl_logging.set_verbosity(absl_logging.WARNING)
    checkpoint.quiet_orbax_errors()  # a failed save is reported as one line (CheckpointError)


@contextlib.contextmanager
def user_errors():
  """User errors become one line and exit status 2 (a diverged run: 3); ``--debug`` re-raises.

  Faults of ours or of the machine (``JaxRuntimeError``) keep their traceback.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from experiments import data  # pylint: disable=import-outside-toplevel
  try:
    yield
  except interrupt.Interrupted as err:  # SIGINT/SIGTERM, saved: one line, exit 130/143
    print(f"\n{err}", file=sys.stderr, flush=True)
    sys.exit(err.exit_code)
  except jax.errors.JaxRuntimeError:
    raise
  except (ValueError, data.DataError, continual.NumericalError) as err:
    if FLAGS.debug:
      raise
    print(f"error: {user_message(err)}", file=sys.stderr)
    sys.exit(3 if isinstance(err, continual.NumericalError) else 2)


def run_main(bench: Benchmark, argv, start_time: float) -> None:
  """absl ``main`` body: one clear message and exit status 2 for user errors."""
  del argv
  import_seconds = time.perf_counter() - start_time
  quiet_logging()
  with user_errors(), interrupt.catch():
    config = config_from_flags(bench.name)
    config.validate()
    preprocess_from_flags()
    seeds = seeds_from_flags(config)
    check_subset_flags(bench)
    check_checkpoint_flags()
    workdir = check_workdir(FLAGS.workdir)
    with lock.hold(workdir):  # the whole run: another run on this workdir exits 2 at once
      if FLAGS.compile_cache:
        enable_compile_cache()
      train_and_evaluate(bench, config, workdir, seeds=seeds, import_seconds=import_seconds,
                         start_time=start_time)


def main_and_exit(main: Callable) -> Callable:
  """``main`` for ``app.run`` in a script's ``__main__``: after a successful run (everything
  written, closed and flushed), the process ends with ``os._exit(0)``, skipping the
  interpreter's teardown of JAX's runtime and thread pools (0.2-0.3 s here, ~4% of a default
  run). Errors take the normal path. Not for in-process callers (tests call ``main``)."""
  def wrapped(argv):
    main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # pylint: disable=protected-access
  return wrapped


def user_message(err: BaseException) -> str:
  """One line; settings are named as flags (:class:`ewc_jax.errors.SettingError`, and data
  errors: ``data_dir '/x' ...`` -> ``--data_dir='/x' ...``)."""
  if isinstance(err, errors.SettingError):
    return " ".join(err.for_flags().split())
  text = " ".join(str(err).split())
  for name in ("data_dir", "dataset", "manual_dir"):
    if text.startswith(name + " "):
      return f"--{name}={text[len(name) + 1:]}"
  return text
