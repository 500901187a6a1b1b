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
import os
import sys
import time
from typing import Callable

from absl import flags

from ewc_jax import errors
from ewc_jax import interrupt
from experiments import config as config_lib
from experiments import config_flags
from experiments import defaults

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


def config_from_flags(benchmark: str | None) -> config_lib.ExperimentConfig:
  """The run's config from the flags given (:func:`experiments.config.make` fills the rest).
  ``benchmark`` None: the ``--benchmark`` flag's (default ``split_mnist``)."""
  given = config_flags.read(config_lib.ExperimentConfig, skip=("benchmark",))
  return config_lib.make(benchmark or FLAGS.benchmark or "split_mnist", **given)


def sweep_config_from_flags() -> config_lib.SweepConfig:
  """The sweep's config from the flags given (``--benchmark``, the swept lists, the rest)."""
  given = config_flags.read(config_lib.SweepConfig, skip=("benchmark",))
  return config_lib.make_sweep(FLAGS.benchmark or "split_mnist", **given)


def quiet_logging() -> None:
  """No INFO lines from TFDS/orbax unless --verbosity or --debug asks for them."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  from ewc_jax import checkpoint  # pylint: disable=import-outside-toplevel
  if not FLAGS["verbosity"].present and not FLAGS.debug:
    absl_logging.set_verbosity(absl_logging.WARNING)
    checkpoint.quiet_orbax_errors()  # a failed save is reported as one line (CheckpointError)


@contextlib.contextmanager
def user_errors():
  """User errors become one line and exit status 2 (a diverged run: 3); ``--debug`` re-raises.

  Faults of ours or of the machine (``JaxRuntimeError``) keep their traceback.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from ewc_jax import continual  # pylint: disable=import-outside-toplevel
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


def run_main(benchmark: str, argv, start_time: float) -> None:
  """absl ``main`` body of a benchmark's script: flags -> config -> ``train_and_evaluate``."""
  del argv
  from experiments import compile_cache  # pylint: disable=import-outside-toplevel
  from experiments import files  # pylint: disable=import-outside-toplevel
  from experiments import lock  # pylint: disable=import-outside-toplevel
  from experiments import train  # pylint: disable=import-outside-toplevel
  import_seconds = time.perf_counter() - start_time
  quiet_logging()
  with user_errors(), interrupt.catch():
    config = config_from_flags(benchmark)
    config.validate()
    workdir = files.check_workdir(FLAGS.workdir)
    with lock.hold(workdir):  # the whole run: another run on this workdir exits 2 at once
      if config.compile_cache:
        compile_cache.enable()
      train.train_and_evaluate(config, workdir, import_seconds=import_seconds,
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
  """One line; settings are named as flags (:class:`ewc_jax.errors.SettingError` and any error
  with ``for_flags()``, e.g. ``NumericalError``; data errors: ``data_dir '/x' ...`` -> ``--data_dir='/x' ...``)."""
  if isinstance(err, errors.SettingError) or callable(getattr(err, "for_flags", None)):
    return " ".join(err.for_flags().split())
  text = " ".join(str(err).split())
  for name in ("data_dir", "dataset", "manual_dir"):
    if text.startswith(name + " "):
      return f"--{name}={text[len(name) + 1:]}"
  return text
