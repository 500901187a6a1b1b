r"""Reproduce published EWC tables: Hsu et al. 2018 and van de Ven & Tolias 2019.

    python -m experiments.reproduce --protocol=hsu                        # Split MNIST, 3 scenarios
    python -m experiments.reproduce --protocol=vandeven --benchmark=split
    python -m experiments.reproduce --protocol=vandeven --benchmark=permuted    # full: very long
    python -m experiments.reproduce --protocol=vandeven --benchmark=permuted \
        --hidden=400,400 --max_examples=10000 --epochs=6                       # a reduced run

The command line only: its flags are generated from the fields of
:class:`experiments.reproduce_config.ReproduceConfig` and become one validated config (a bad value
is refused with one line naming the flag, the value and what is allowed; exit 2), then
:func:`experiments.reproduce_runner.reproduce` runs the rows. Each (scenario, algorithm) is one
``ewc_jax.continual.sweep.run`` over the seeds (Permuted MNIST: one per seed, each seed on its own
permutations), with the paper's inputs, initialisation and hyperparameters translated to our
conventions (:mod:`experiments.paper_tables`) and its protocol controls. Results accumulate in a
JSON store (``--json``, default ``--out`` with ``.json``; :mod:`experiments.results_store`) keyed
by protocol / benchmark / variant / scenario / algorithm, and the tables of every stored result
are rewritten between two markers in ``--out`` (text outside the markers is kept;
:mod:`experiments.results_report`). Any departure from the protocol (``--epochs``,
``--hidden``, ``--max_examples``, ``--num_tasks``, or a λ check ``--lam_factor``) makes a
*reduced* variant named by its departures, stored and shown apart from the full protocol.
"""

from __future__ import annotations

import contextlib
import time

_START = time.perf_counter()

if __name__ == "__main__":  # first thing: Ctrl-C / SIGTERM during the imports exit at once
  from experiments import signals
  signals.install()

# pylint: disable=wrong-import-position
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from experiments import cli  # noqa: E402
from experiments import compile_cache  # noqa: E402
from experiments import config_flags  # noqa: E402
from experiments import data  # noqa: E402
from experiments import files  # noqa: E402
from experiments import lock  # noqa: E402
from experiments import orbax_logs  # noqa: E402
from experiments import progress as progress_lib  # noqa: E402
from experiments import reproduce_runner  # noqa: E402
from experiments import signals  # noqa: E402
from experiments.reproduce_config import ReproduceConfig  # noqa: E402

config_flags.define(ReproduceConfig)
flags.DEFINE_bool("debug", False, "Show full tracebacks for user errors.")
FLAGS = flags.FLAGS


def config_from_flags() -> ReproduceConfig:
  """The validated config of the flags given (the fields' defaults for the others)."""
  config = ReproduceConfig(**config_flags.read(ReproduceConfig))
  config.validate()
  return config


def run(config: ReproduceConfig, held: contextlib.ExitStack) -> None:
  """Runs the rows of ``config`` (reads no flag): the output folders checked, the workdir locked
  into ``held`` when checkpointing, the data loaded, then the runner."""
  for path in (config.out_path, config.json_path):
    files.check_workdir(str(path.parent))
  root = None
  if config.checkpoint:
    workdir = files.check_workdir(config.workdir)
    held.enter_context(lock.hold(workdir))  # another invocation on it exits 2 at once
    root = workdir / "checkpoints"
  if config.compile_cache:
    compile_cache.enable()
  ds = data.load_dataset("mnist", data_dir=config.data_dir)
  overrides = config.overrides
  print(f"{config.setup.citation}\n{len(config.scenarios) * len(config.algo_names)} runs of "
        f"{len(config.seeds)} seeds"
        + (f"; REDUCED: {'; '.join(overrides.describe())}" if overrides.reduced else ""),
        flush=True)
  t0 = time.perf_counter()
  progress = ((lambda prefix: progress_lib.make(True, prefix)) if config.progress else None)
  reproduce_runner.reproduce(
      config.setup, config.algo_names, config.scenarios, config.seeds, ds, out=config.out_path,
      json_path=config.json_path, overrides=overrides, progress=progress,
      log=lambda *a, **k: print(*a, **k, flush=True), checkpoint_root=root,
      checkpoint_every=config.checkpoint_every, rerun=config.rerun)
  print(f"total {time.perf_counter() - t0:.0f} s (startup {t0 - _START:.1f} s); "
        f"wrote {config.out_path} and {config.json_path}")


def main(argv):
  """Flags -> :class:`ReproduceConfig` -> :func:`run`; user errors are one ``error:`` line
  naming the flag, exit 2 (:func:`experiments.cli.user_errors`)."""
  if not FLAGS.debug:
    orbax_logs.quiet_orbax_errors()
  with cli.user_errors(), signals.catch(), contextlib.ExitStack() as held:
    cli.check_arguments(argv)
    run(config_from_flags(), held)


if __name__ == "__main__":
  app.run(cli.main_and_exit(main))
