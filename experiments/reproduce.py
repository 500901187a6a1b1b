r"""Reproduce published EWC tables: Hsu et al. 2018 and van de Ven & Tolias 2019.

    python -m experiments.reproduce --protocol=hsu                        # Split MNIST, 3 scenarios
    python -m experiments.reproduce --protocol=vandeven --benchmark=split
    python -m experiments.reproduce --protocol=vandeven --benchmark=permuted    # full: very long
    python -m experiments.reproduce --protocol=vandeven --benchmark=permuted \
        --hidden=400,400 --max_examples=10000 --epochs=6                       # a reduced run

The command line only: the flags become one validated :class:`Options` (a bad value is refused
with one line naming the flag, the value and what is allowed; exit 2), then
:func:`experiments.reproduce_runner.reproduce` runs the rows. Each (scenario, algorithm) is one
``ewc_jax.continual.sweep.run`` over the seeds, with the paper's hyperparameters translated to our
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
import dataclasses
import math
import sys
import time
from pathlib import Path

_START = time.perf_counter()

if __name__ == "__main__":  # first thing: Ctrl-C / SIGTERM during the imports exit at once
  from experiments import signals
  signals.install()

# pylint: disable=wrong-import-position
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from experiments import compile_cache  # noqa: E402
from experiments import files  # noqa: E402
from experiments import progress as progress_lib  # noqa: E402
from experiments import reproduce_runner  # noqa: E402
from experiments import signals  # noqa: E402
from experiments.paper_tables import BENCHMARKS, SCENARIOS, Setup, get_setup  # noqa: E402

flags.DEFINE_enum("protocol", "hsu", ["hsu", "vandeven"], "Which paper's protocol.")
flags.DEFINE_enum("benchmark", "split", ["split", "permuted"], "Split MNIST or Permuted MNIST "
                  "(Permuted: --protocol=vandeven only).")
flags.DEFINE_list("algos", None, "Algorithms (default: every one the paper reports).")
flags.DEFINE_list("scenarios", list(SCENARIOS), "Scenarios: task, domain, class.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds, trained together as one vmapped run.")
flags.DEFINE_integer("epochs", None, "Override the epochs per task (marks the result reduced).")
flags.DEFINE_list("hidden", None, "Override the MLP widths (marks the result reduced).")
flags.DEFINE_integer("max_examples", None, "Keep the first N train and test examples of each "
                     "task (marks the result reduced).")
flags.DEFINE_integer("num_tasks", None, "Override the number of tasks (marks it reduced).")
flags.DEFINE_float("lam_factor", None, "A λ check: multiply the translated λ by this factor "
                   "(stored and shown apart, as a reduced variant).")
flags.DEFINE_string("out", "docs/results.md", "Markdown file: the tables are rewritten between "
                    "two markers, the rest of the file is kept.")
flags.DEFINE_string("json", None, "JSON store of every result (default: --out with .json).")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default as in experiments.split_mnist).")
flags.DEFINE_string("workdir", "runs/reproduce", "Where the runs' checkpoints live (under "
                    "<workdir>/checkpoints, one folder per scenario/algorithm, deleted once its "
                    "record is stored); locked for the run.")
flags.DEFINE_bool("checkpoint", True, "Checkpoint each sweep after every task (and every "
                  "--checkpoint_every steps); re-running a killed or interrupted invocation "
                  "resumes it bit for bit.")
flags.DEFINE_integer("checkpoint_every", 0, "Also checkpoint within a task every N train steps "
                     "(whole chunks of 64); 0: only after each task.")
flags.DEFINE_bool("progress", True, "Show a progress bar per task.")
flags.DEFINE_bool("compile_cache", True, "Use JAX's persistent compilation cache.")
flags.DEFINE_bool("debug", False, "Show full tracebacks for user errors.")
flags.DEFINE_bool("rerun", False, "Train rows the JSON store already holds for the same seeds "
                  "again (default: keep them and go on with the missing rows).")
FLAGS = flags.FLAGS


def _ints(name: str, values) -> tuple[int, ...]:
  """The comma-separated list flag ``--name`` as integers (seeds >= 0, widths >= 1)."""
  try:
    out = tuple(int(v) for v in values)
  except (TypeError, ValueError) as err:
    raise ValueError(f"--{name}={','.join(map(str, values))} is invalid: expected integers "
                     "separated by commas.") from err
  if not out or any(v < (0 if name == "seeds" else 1) for v in out):
    raise ValueError(f"--{name}={','.join(map(str, values))} is invalid: expected "
                     + ("seeds >= 0." if name == "seeds" else "integers >= 1."))
  return out


@dataclasses.dataclass(frozen=True)
class Options:
  """One invocation, read from the flags once (:meth:`from_flags`) and validated."""
  setup: Setup
  algos: tuple[str, ...]
  scenarios: tuple[str, ...]
  seeds: tuple[int, ...]
  overrides: reproduce_runner.Overrides
  out: Path                        # the markdown file
  json_path: Path                  # the JSON store
  data_dir: str | None
  workdir: str
  checkpoint: bool
  checkpoint_every: int
  progress: bool
  compile_cache: bool
  rerun: bool = False

  @classmethod
  def from_flags(cls, values: flags.FlagValues) -> Options:
    """The options of the parsed flags ``values``; a ValueError naming the flag, its value and
    what is allowed for the first one that is invalid."""
    setup = get_setup(values.protocol, values.benchmark)
    algos = tuple(values.algos) if values.algos else setup.algos
    for a in algos:
      if a not in setup.published:
        raise ValueError(f"--algos={','.join(algos)} is invalid for --protocol={setup.protocol} "
                         f"--benchmark={setup.benchmark}: expected some of "
                         f"{', '.join(setup.algos)}.")
    scenarios = tuple(values.scenarios or ())
    for s in scenarios or ("",):
      if s not in SCENARIOS:
        raise ValueError(f"--scenarios={','.join(scenarios)} is invalid: expected some of "
                         f"{', '.join(SCENARIOS)}.")
    seeds = _ints("seeds", values.seeds)
    if len(set(seeds)) != len(seeds):
      raise ValueError(f"--seeds={','.join(values.seeds)} is invalid: expected distinct seeds.")
    for name in ("epochs", "max_examples", "num_tasks"):
      value = getattr(values, name)
      if value is not None and value < 1:
        raise ValueError(f"--{name}={value} is invalid: expected an integer >= 1.")
    most = BENCHMARKS[setup.benchmark].tasks_for(10)[1]  # MNIST's 10 classes
    if values.num_tasks is not None and most and values.num_tasks > most:
      raise ValueError(f"--num_tasks={values.num_tasks} is invalid: expected "
                       f"1..{most}.")
    if values.lam_factor is not None and not (math.isfinite(values.lam_factor)
                                               and values.lam_factor > 0):
      raise ValueError(f"--lam_factor={values.lam_factor} is invalid: expected a number > 0.")
    overrides = reproduce_runner.Overrides(
        epochs=values.epochs, hidden=_ints("hidden", values.hidden) if values.hidden else None,
        max_examples=values.max_examples, num_tasks=values.num_tasks,
        lam_factor=values.lam_factor)
    if values.checkpoint_every is None or values.checkpoint_every < 0:
      raise ValueError(f"--checkpoint_every={values.checkpoint_every} is invalid: expected an "
                       "integer >= 0 (0: only after each task).")
    out = Path(values.out)
    return cls(setup=setup, algos=algos, scenarios=scenarios, seeds=seeds, overrides=overrides,
               out=out, json_path=Path(values.json) if values.json else out.with_suffix(".json"),
               data_dir=values.data_dir, workdir=values.workdir, checkpoint=values.checkpoint,
               checkpoint_every=values.checkpoint_every, progress=values.progress,
               compile_cache=values.compile_cache, rerun=values.rerun)


def main(argv):
  """Flags -> :class:`Options` -> the runner; user errors are one ``error:`` line, exit 2."""
  del argv
  import jax  # pylint: disable=import-outside-toplevel
  from ewc_jax import interrupt  # pylint: disable=import-outside-toplevel
  from experiments import data, lock, orbax_logs  # pylint: disable=import-outside-toplevel
  if not FLAGS.debug:
    orbax_logs.quiet_orbax_errors()
  try:
    with signals.catch(), contextlib.ExitStack() as held:
      opts = Options.from_flags(FLAGS)
      for path in (opts.out, opts.json_path):
        files.check_workdir(str(path.parent))
      root = None
      if opts.checkpoint:
        workdir = files.check_workdir(opts.workdir)
        held.enter_context(lock.hold(workdir))  # another invocation on it exits 2 at once
        root = workdir / "checkpoints"
      if opts.compile_cache:
        compile_cache.enable()
      ds = data.load_dataset("mnist", data_dir=opts.data_dir)
      overrides = opts.overrides
      print(f"{opts.setup.citation}\n{len(opts.scenarios) * len(opts.algos)} runs of "
            f"{len(opts.seeds)} seeds"
            + (f"; REDUCED: {'; '.join(overrides.describe())}" if overrides.reduced else ""),
            flush=True)
      t0 = time.perf_counter()
      progress = ((lambda prefix: progress_lib.make(True, prefix)) if opts.progress else None)
      reproduce_runner.reproduce(
          opts.setup, opts.algos, opts.scenarios, opts.seeds, ds, out=opts.out,
          json_path=opts.json_path, overrides=overrides, progress=progress, log=lambda *a, **k: print(*a, **k, flush=True),
          checkpoint_root=root, checkpoint_every=opts.checkpoint_every, rerun=opts.rerun)
      print(f"total {time.perf_counter() - t0:.0f} s (startup {t0 - _START:.1f} s); "
            f"wrote {opts.out} and {opts.json_path}")
  except interrupt.Interrupted as err:
    print(signals.interrupted_line(err), file=sys.stderr, flush=True)
    sys.exit(signals.exit_code(err.signum))
  except jax.errors.JaxRuntimeError:
    raise
  except (ValueError, data.DataError, OSError) as err:
    if FLAGS.debug:
      raise
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from experiments import cli  # pylint: disable=ungrouped-imports
  app.run(cli.main_and_exit(main))
