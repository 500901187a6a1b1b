"""What every experiment CLI shares: flags -> Config, the run, the printed table and the outputs.

Thin by design (like flax/examples/mnist): ``main`` parses flags into a plain :class:`Config` and
calls ``train_and_evaluate(config, workdir)``. User errors (bad flag values, missing data) print
one line naming the flag and exit with status 2, writing nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from absl import flags

from ewc_jax import continual
from ewc_jax import fisher as fisher_lib

FLAGS = flags.FLAGS


def define_flags(default_workdir: str) -> None:
  """Defines the flags shared by every benchmark (defaults: the peers' Split MNIST protocol)."""
  d = continual.Config()
  flags.DEFINE_string("algo", d.algo, f"Algorithm: {'|'.join(continual.ALGOS)}.")
  flags.DEFINE_string("penalty", d.penalty,
                      "EWC penalty: standard = (lam/2)*sum F|theta-theta*|^p (Kirkpatrick 2017); "
                      "seed = the seed reference's per-tensor p-norm / task id; "
                      "clarena = CLArena 1.1.0's 0.5*lam*sum F (theta-theta*)^2.")
  flags.DEFINE_float("lam", d.lam, "Regularisation strength lambda (> 0). Convention: the loss "
                     "adds (lam/2) * sum_k sum_i F_ki |theta_i - theta*_ki|^p, with F the mean "
                     "per-example Fisher (no 1/num_params).")
  flags.DEFINE_float("p", d.p, "Exponent p of |theta - theta*| (> 0).")
  flags.DEFINE_string("fisher", d.fisher, f"Importance estimator: {'|'.join(fisher_lib.KINDS)}.")
  flags.DEFINE_integer("fisher_batch_size", d.fisher_batch_size,
                       "Examples per Fisher scan step (changes the result only for batch_squared).")
  flags.DEFINE_bool("fisher_normalize", d.fisher_normalize,
                    "Divide the importance by the number of backbone parameters (seed parity).")
  flags.DEFINE_integer("epochs", d.epochs, "Epochs per task (>= 1).")
  flags.DEFINE_integer("batch_size", d.batch_size, "Training batch size (>= 1).")
  flags.DEFINE_float("lr", d.lr, "Adam learning rate, optimizer restarted at every task (> 0).")
  flags.DEFINE_integer("seed", d.seed, "PRNG seed: initialisation, shuffling, sampled labels.")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: $TFDS_DATA_DIR, else "
                      "../shared/tensorflow_datasets when present, else TFDS's default).")
  flags.DEFINE_string("manual_dir", None, "Folder with the raw dataset files, to prepare the "
                      "dataset offline when data_dir does not hold it (needs tensorflow-cpu).")
  flags.DEFINE_string("workdir", default_workdir, "Where results.json is written.")
  flags.DEFINE_integer("num_tasks", None, "Run only the first N tasks (default: all).")
  flags.DEFINE_integer("max_examples", None, "Keep at most N train and N test examples per task "
                       "(quick checks; default: all).")
  flags.DEFINE_bool("progress", True, "Show a progress bar per task.")
  flags.DEFINE_bool("compile_cache", True, "Use JAX's persistent compilation cache.")
  flags.DEFINE_bool("debug", False, "Show full tracebacks for user errors.")


def config_from_flags() -> continual.Config:
  return continual.Config(
      algo=FLAGS.algo, penalty=FLAGS.penalty, lam=FLAGS.lam, p=FLAGS.p, fisher=FLAGS.fisher,
      fisher_batch_size=FLAGS.fisher_batch_size, fisher_normalize=FLAGS.fisher_normalize,
      epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, lr=FLAGS.lr, seed=FLAGS.seed)


def check_subset_flags(available_tasks: int) -> tuple[int, int | None]:
  """Validated ``(--num_tasks, --max_examples)``."""
  num_tasks = available_tasks if FLAGS.num_tasks is None else FLAGS.num_tasks
  if not 1 <= num_tasks <= available_tasks:
    raise ValueError(f"--num_tasks={FLAGS.num_tasks} is invalid: expected an integer in "
                     f"1..{available_tasks}.")
  if FLAGS.max_examples is not None and FLAGS.max_examples < 1:
    raise ValueError(f"--max_examples={FLAGS.max_examples} is invalid: expected an integer >= 1.")
  return num_tasks, FLAGS.max_examples


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


def write_json_atomic(path: Path, obj) -> None:
  """Writes JSON to a temporary file in the same folder, then renames it over ``path``."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2)
      f.write("\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def format_matrix(acc_matrix) -> str:
  """The accuracy matrix as a text table (rows: after training task i; columns: task j)."""
  t = len(acc_matrix)
  head = "after \\ on " + "".join(f"{'T' + str(j + 1):>8}" for j in range(t)) + f"{'mean':>8}"
  lines = [head, "-" * len(head)]
  for i, row in enumerate(acc_matrix):
    seen = row[:i + 1]
    lines.append(f"{'T' + str(i + 1):<11}" + "".join(f"{100 * v:8.2f}" for v in row)
                 + f"{100 * sum(seen) / len(seen):8.2f}")
  return "\n".join(lines)


def environment() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "backend": jax.default_backend(),
          "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
          "num_devices": jax.device_count()}


def make_progress(enabled: bool) -> Callable | None:
  if not enabled:
    return None
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

  def progress(task_index: int, total: int):
    return tqdm(total=total, desc=f"task {task_index + 1}", unit="step", leave=True,
                dynamic_ncols=True, file=sys.stderr)
  return progress


def run_main(train_and_evaluate: Callable, argv, start_time: float) -> None:
  """absl ``main`` body: one clear message and exit status 2 for user errors."""
  del argv
  import_seconds = time.perf_counter() - start_time
  import jax  # pylint: disable=import-outside-toplevel
  from experiments import data  # pylint: disable=import-outside-toplevel
  try:
    config = config_from_flags()
    config.validate()
    workdir = check_workdir(FLAGS.workdir)
    if FLAGS.compile_cache:
      enable_compile_cache()
    train_and_evaluate(config, workdir, import_seconds=import_seconds)
  except jax.errors.JaxRuntimeError:
    raise  # a fault of ours or of the machine, not of the user's input: keep the traceback
  except (ValueError, data.DataError) as err:
    if FLAGS.debug:
      raise
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def results_record(config: continual.Config, result: continual.Result, timings: dict,
                   benchmark: dict) -> dict:
  summary = continual.summary(result)
  return {
      "benchmark": benchmark,
      "acc_matrix": [[float(v) for v in row] for row in result.acc_matrix],
      **summary,
      "curves": result.curves,
      "config": dataclasses.asdict(config),
      "timings": timings,
      "environment": environment(),
  }
