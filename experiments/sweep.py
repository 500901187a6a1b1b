r"""Hyperparameter sweeps: every combination of the listed values, trained at once (vmapped).

    python -m experiments.sweep --benchmark=split_mnist --algo=ewc --lam=1,10,100,1000 --seeds=0,1,2
    python -m experiments.sweep --algo=ewc --lam=10,1000 --p=1,2 --lr=1e-3,3e-3 --max_parallel=4
    python -m experiments.sweep --benchmark=permuted_mnist --algo=online_ewc --gamma=0.5,0.9,1

Swept flags take comma-separated lists: --lam, --p, --lr, --gamma and --seeds (or one --seed);
the sweep is their product. Every other flag of experiments.split_mnist / permuted_mnist keeps
its meaning and is shared by all configs. All configs are trained together as one program with
a leading config axis (``jax.vmap`` of the single run; each config gives the single run's
result), sharded over all devices (``ewc_jax.continual.sweep``); --max_parallel=N runs at most N at a time.
Permuted MNIST's permutations follow the seed, so there each seed is its own sweep (its data).

Sweeps hold out --validation_fraction=0.1 of each task's training data by default (the same
rows for every config). Writes under --workdir: results.json (every config's test and
validation accuracy matrices, metrics and curves, and the table of the swept values ranked by
validation average accuracy, mean ± std over seeds) and
average_accuracy.png (average accuracy vs λ, one line per other swept combination, seed error
bars, log x-axis).

Checkpoints as for a single run (--checkpoint, --resume, --force_restart, --checkpoint_every,
--keep): the whole batched state of every config is saved under <workdir>/checkpoints/
group_<g>/chunk_<i> (one folder per seed group and --max_parallel chunk; first_task_<i> for the
first task when it is trained once per group of configs differing only in λ, p, γ) after each
task and every --checkpoint_every steps; re-running the same command resumes every config bit for
bit.
The checkpoints' identity is the swept grid, the shared flags and the layout (chunks, devices):
anything else is refused naming the keys. The workdir is locked for the run; SIGINT/SIGTERM
save the position and exit 130/143. With --distributed, sweeps are not checkpointed (yet).
"""

import time

_START = time.perf_counter()

if __name__ == "__main__":  # first thing: Ctrl-C / SIGTERM during the imports exit at once
  from experiments import signals
  signals.install()

# pylint: disable=wrong-import-position
import contextlib  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from experiments import cli  # noqa: E402
from experiments import compile_cache
from experiments import config as config_lib  # noqa: E402
from experiments import signals  # noqa: E402
from experiments import train_sweep

FLAGS = flags.FLAGS
cli.define_flags(config_cls=config_lib.SweepConfig, shown_defaults=config_lib.SWEEP_DEFAULTS)


def main(argv):
  import_seconds = time.perf_counter() - _START
  cli.quiet_logging()
  with cli.user_errors():
    cli.check_arguments(argv)
    with contextlib.ExitStack() as held:
      _main(held, import_seconds)


def _main(held: contextlib.ExitStack, import_seconds: float) -> None:

  # The workdir is locked first, unless the sweep spans hosts (then process 0 locks it once
  # jax.distributed is up); a bad flag after the lock leaves nothing behind.
  distributed = bool(FLAGS["distributed"].value)
  workdir = Path(FLAGS.workdir)
  if not distributed:
    workdir = held.enter_context(cli.workdir_locked(FLAGS.workdir))
  config = cli.sweep_config_from_flags()
  config.validate()
  checkpoints = True
  if config.distributed and config.experiment.checkpoint:
    if FLAGS["checkpoint"].present:
      raise ValueError("--checkpoint is not supported with --distributed (yet): pass "
                       "--nocheckpoint.")
    checkpoints = False
  if config.distributed:
    jax.distributed.initialize(coordinator_address=config.coordinator_address,
                               num_processes=config.num_processes,
                               process_id=config.process_id)
  writer = jax.process_index() == 0
  if distributed and writer:  # the whole run: another run on this workdir exits 2 at once
    workdir = held.enter_context(cli.workdir_locked(FLAGS.workdir))
  if config.experiment.compile_cache:
    compile_cache.enable()
  with signals.catch():
    record = train_sweep.train_and_evaluate_sweep(
        config, workdir, writer=writer, checkpoints=checkpoints, import_seconds=import_seconds,
        start_time=_START)
  line = train_sweep.divergence_line(record) if record is not None else None
  if line is not None:  # the healthy configs' results are written; the status says some diverged
    print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(3)


if __name__ == "__main__":
  app.run(cli.main_and_exit(main), flags_parser=cli.parse_flags)
