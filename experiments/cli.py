"""What every experiment command line shares: flags generated from the config, parsed into it,
and one-line errors.

A main (``experiments.split_mnist``, ``permuted_mnist``, ``sweep``) calls :func:`define_flags`
at import and :func:`run_main` (or the sweep's equivalent) in ``main``: the flags become one
frozen :class:`experiments.config.ExperimentConfig` (:func:`config_from_flags`), then
:func:`experiments.train.train_and_evaluate` runs it, reading no flag. User errors (bad flag
values, missing data, an unwritable workdir) print one line naming the flag and exit with status
2, writing nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable
from typing import Iterator

from absl import flags
from absl import logging as absl_logging

from ewc_jax import continual
from ewc_jax import errors
from ewc_jax import interrupt
from experiments import compile_cache
from experiments import config as config_lib
from experiments import config_flags
from experiments import data
from experiments import defaults
from experiments import files
from experiments import lock
from experiments import orbax_logs
from experiments import signals
from experiments import train

FLAGS = flags.FLAGS


def define_flags(benchmark: str | None = None, *, config_cls: type = config_lib.ExperimentConfig,
                 shown_defaults: dict | None = None) -> None:
  """Defines a flag per field of ``config_cls`` (and the run config nested in it), plus
  ``--workdir`` and ``--debug``. ``benchmark``: the script's fixed benchmark (no
  ``--benchmark`` flag; workdir ``runs/<benchmark>``); None: a ``--benchmark`` flag."""
  config_flags.define(config_cls, skip=("benchmark",) if benchmark else (),
                      defaults=shown_defaults, per_benchmark=defaults.PER_BENCHMARK)
  flags.DEFINE_string("workdir", f"runs/{benchmark or 'sweep'}", "Where the outputs are written.")
  flags.DEFINE_bool("debug", False, "Show full tracebacks for user errors.")


def parse_flags(argv):
  """``app.run`` flags parser: an unknown flag or unparsable value gives one line and status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as err:
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    sys.exit(2)


def check_conflicts() -> None:
  """Flags that cannot be given together, or given empty, are refused (never one silently
  ignored): ``--seed`` with ``--seeds``; ``--dataset=`` (empty: not the benchmark's)."""
  if FLAGS["seed"].present and FLAGS["seeds"].present:
    raise errors.SettingError(lambda n: (
        f"{n('seed')}={FLAGS.seed} and {n('seeds')}={','.join(FLAGS.seeds)} are invalid "
        f"together: expected one of them ({n('seeds')} runs each of its seeds)."))
  for name in ("dataset", "data_dir", "manual_dir", "input_norm"):
    if name in FLAGS and FLAGS[name].present and not str(FLAGS[name].value or "").strip():
      raise errors.SettingError(lambda n, name=name: (
          f"{n(name)}='' is invalid: expected a value (leave the flag out for its default)."))


def config_from_flags(benchmark: str | None) -> config_lib.ExperimentConfig:
  """The run's config from the flags given (:func:`experiments.config.make` fills the rest).
  ``benchmark`` None: the ``--benchmark`` flag's (default ``split_mnist``)."""
  check_conflicts()
  given = config_flags.read(config_lib.ExperimentConfig, skip=("benchmark",))
  return config_lib.make(benchmark or FLAGS.benchmark or "split_mnist", **given)


def sweep_config_from_flags() -> config_lib.SweepConfig:
  """The sweep's config from the flags given (``--benchmark``, the swept lists, the rest)."""
  check_conflicts()
  given = config_flags.read(config_lib.SweepConfig, skip=("benchmark",))
  return config_lib.make_sweep(FLAGS.benchmark or "split_mnist", **given)


def quiet_logging() -> None:
  """No log lines from TFDS/orbax/JAX (INFO, WARNING) unless --verbosity or --debug asks for
  them (or ``JAX_LOG_COMPILES`` JAX's): the command line's own lines (and one ``error:`` line)
  are what stdout/stderr show."""


  if not FLAGS["verbosity"].present and not FLAGS.debug:
    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    if os.environ.get("JAX_LOG_COMPILES", "").lower() in ("1", "true"):  # asked for: kept
      logging.getLogger("jax").setLevel(logging.WARNING)
    orbax_logs.quiet_orbax_errors()  # a failed save is reported as one line (CheckpointError)
    warnings.showwarning = _one_line_warning  # Python warnings: "warning: ..." (no source line)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
  """``warnings.showwarning`` of the command lines: one ``warning:`` line on stderr."""
  del category, filename, lineno, line
  text = " ".join(str(message).split())
  print(f"warning: {text}", file=file or sys.stderr, flush=True)


@contextlib.contextmanager
def user_errors():
  """Every error becomes one ``error:`` line (``--debug``: re-raised, with its traceback).

  Exit status: 2 for bad input and OS errors (a full disk, a read-only folder, a file where a
  folder is expected), 3 for a diverged run, 130 / 143 for SIGINT / SIGTERM (saved or not: the
  :class:`ewc_jax.interrupt.Interrupted` line), 1 for anything else (a bug or a fault of the
  machine, e.g. a ``JaxRuntimeError``: its first line; ``--debug`` shows the traceback).
  """
  try:
    yield
  except interrupt.Interrupted as err:  # SIGINT/SIGTERM at a chunk boundary: one line
    print(signals.interrupted_line(err), file=sys.stderr, flush=True)
    sys.exit(signals.exit_code(err.signum))
  except (ValueError, data.DataError, continual.NumericalError, OSError) as err:
    if FLAGS.debug:
      raise
    print(f"error: {user_message(err)}", file=sys.stderr)
    sys.exit(3 if isinstance(err, continual.NumericalError) else 2)
  except Exception as err:  # noqa: BLE001 (ours or the machine's: one line, --debug shows more)
    if FLAGS.debug:
      raise
    text = str(err).strip()
    print(f"error: {type(err).__name__}: {text.splitlines()[0] if text else ''} (an internal "
          "error or a fault of the machine; --debug shows the traceback)", file=sys.stderr)
    sys.exit(1)


def check_arguments(argv) -> None:
  """No positional argument: every setting is a flag (a stray word is refused, not ignored)."""
  extra = list(argv[1:]) if argv else []
  if extra:
    raise ValueError(f"unexpected argument {extra[0]!r}: every setting is a flag, written "
                     "--name=value (see --help).")


@contextlib.contextmanager
def workdir_locked(workdir: str) -> Iterator[Path]:
  """``workdir`` checked (created if needed) and locked for the block (another run on it exits
  2 at once); on an error inside, the lock file and the folders created here are removed again
  when nothing was written into them."""
  with files.workdir_claimed(workdir) as path, lock.hold(path):
    yield path


def run_main(benchmark: str, argv, start_time: float) -> None:
  """absl ``main`` body of a benchmark's script: flags -> config -> ``train_and_evaluate``.

  The workdir is checked and locked first, then the settings are checked, then the run (with
  :func:`experiments.signals.catch`'s stop requests; before it, a signal ends the process at
  once: :mod:`experiments.signals`)."""
  import_seconds = time.perf_counter() - start_time
  quiet_logging()
  with user_errors():
    check_arguments(argv)
    with workdir_locked(FLAGS.workdir) as workdir:
      config = config_from_flags(benchmark)  # checked first thing by train_and_evaluate
      if config.compile_cache:
        compile_cache.enable()
      with signals.catch():
        train.train_and_evaluate(config, workdir, import_seconds=import_seconds,
                                 start_time=start_time)


def main_and_exit(main: Callable) -> Callable:
  """``main`` for ``app.run`` in a script's ``__main__``: however ``main`` ends (success, an
  error's ``sys.exit``, an uncaught exception), the process ends right after it through
  :func:`experiments.signals.exit_now` (streams flushed, ``os._exit``): no thread left behind
  (orbax's, after a failed save) can keep it, and the workdir's lock, alive, and the
  interpreter's teardown of JAX's runtime is skipped (0.2-0.3 s). Not for in-process callers
  (tests call ``main``)."""
  def wrapped(argv):
    code = 0
    try:
      main(argv)
    except SystemExit as err:
      code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
      if not isinstance(err.code, (int, type(None))):
        print(err.code, file=sys.stderr)
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
      code = 1
    signals.exit_now(code)
  return wrapped


def user_message(err: BaseException) -> str:
  """One line; settings are named as flags (:class:`ewc_jax.errors.SettingError` and any error
  with ``for_flags()``, e.g. ``NumericalError``; data errors: ``data_dir '/x' ...`` -> ``--data_dir='/x' ...``)."""
  if isinstance(err, errors.SettingError) or callable(getattr(err, "for_flags", None)):
    return " ".join(err.for_flags().split())
  text = " ".join(str(err).split())
  for name in ("data_dir", "dataset", "manual_dir"):
    if text.startswith(name + " "):
      return f"--{name}={text[len(name) + 1:]}"
  return text
