"""The config of one reproduction (``python -m experiments.reproduce``): one frozen, typed object.

Every setting is a field with its ``metadata["help"]``; the command line generates its flags
from the fields (:mod:`experiments.config_flags`), as the other commands do from
:class:`experiments.config.ExperimentConfig`. :meth:`ReproduceConfig.validate` refuses a bad
value with a :class:`ewc_jax.errors.SettingError` naming the setting, its value and what is
allowed (a command line spells it as its flag). The derived values (the paper's
:class:`~experiments.paper_tables.Setup`, the algorithms, the protocol's departures, the output
paths) are properties: each is computed in one place.

    >>> from experiments.reproduce_config import ReproduceConfig
    >>> c = ReproduceConfig(protocol="vandeven", benchmark="permuted", epochs=6)
    >>> c.validate()
    >>> c.algo_names, c.overrides.reduced, str(c.json_path)
    (('finetune', 'joint', 'ewc', 'online_ewc'), True, 'docs/results.json')
    >>> ReproduceConfig(seeds=(1, 1)).validate()
    Traceback (most recent call last):
    ewc_jax.errors.SettingError: `seeds`=1,1 is invalid: expected distinct seeds.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ewc_jax import errors
from experiments import paper_tables
from experiments import reproduce_runner
from experiments.config import setting


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
  """One invocation of the reproduction runner (the fields are the command line's flags)."""

  protocol: str = setting("hsu", "Which paper's protocol: hsu or vandeven.")
  benchmark: str = setting("split", "Split MNIST or Permuted MNIST: split or permuted "
                           "(permuted: --protocol=vandeven only).")
  algos: tuple[str, ...] | None = setting(None, "Algorithms (default: every one the paper "
                                          "reports).")
  scenarios: tuple[str, ...] = setting(paper_tables.SCENARIOS, "Scenarios: task, domain, class.")
  seeds: tuple[int, ...] = setting((0, 1, 2), "Seeds: trained together as one vmapped run "
                                   "(split), or one run each on its own permutations "
                                   "(permuted).")
  epochs: int | None = setting(None, "Override the epochs per task (marks the result reduced).")
  hidden: tuple[int, ...] | None = setting(None, "Override the MLP widths (marks the result "
                                           "reduced).")
  max_examples: int | None = setting(None, "Keep the first N train and test examples of each "
                                     "task (marks the result reduced).")
  num_tasks: int | None = setting(None, "Override the number of tasks (marks it reduced).")
  lam_factor: float | None = setting(None, "A λ check: multiply the translated λ by this factor "
                                     "(stored and shown apart, as a reduced variant).")
  out: str = setting("docs/results.md", "Markdown file: the tables are rewritten between two "
                     "markers, the rest of the file is kept.")
  json: str | None = setting(None, "JSON store of every result (default: --out with .json).")
  data_dir: str | None = setting(None, "TFDS data_dir (default as in experiments.split_mnist).")
  workdir: str = setting("runs/reproduce", "Where the runs' checkpoints live (under "
                         "<workdir>/checkpoints, one folder per scenario/algorithm, deleted once "
                         "its record is stored); locked for the run.")
  checkpoint: bool = setting(True, "Checkpoint each sweep after every task (and every "
                             "--checkpoint_every steps); re-running a killed or interrupted "
                             "invocation resumes it bit for bit.")
  checkpoint_every: int = setting(0, "Also checkpoint within a task every N train steps (whole "
                                  "chunks of 64); 0: only after each task.")
  progress: bool = setting(True, "Show a progress bar per task.")
  compile_cache: bool = setting(True, "Use JAX's persistent compilation cache.")
  rerun: bool = setting(False, "Train rows the JSON store already holds for the same seeds "
                        "again (default: keep them and go on with the missing rows).")

  @property
  def setup(self) -> paper_tables.Setup:
    """The paper's table for ``protocol`` and ``benchmark``."""
    return paper_tables.get_setup(self.protocol, self.benchmark)

  @property
  def algo_names(self) -> tuple[str, ...]:
    """``algos``, or every algorithm the paper reports."""
    return tuple(self.algos) if self.algos else self.setup.algos

  @property
  def overrides(self) -> reproduce_runner.Overrides:
    """The departures from the paper's protocol (any one makes the result reduced)."""
    return reproduce_runner.Overrides(epochs=self.epochs, hidden=self.hidden,
                                      max_examples=self.max_examples, num_tasks=self.num_tasks,
                                      lam_factor=self.lam_factor)

  @property
  def out_path(self) -> Path:
    """The markdown file."""
    return Path(self.out)

  @property
  def json_path(self) -> Path:
    """The JSON store: ``json``, else ``out`` with ``.json``."""
    return Path(self.json) if self.json else self.out_path.with_suffix(".json")

  def validate(self) -> None:
    """Raises a :class:`ewc_jax.errors.SettingError` for the first invalid setting."""
    setup = self.setup
    for a in self.algo_names:
      if a not in setup.published:
        raise errors.SettingError(lambda n: (
            f"{n('algos')}={','.join(self.algo_names)} is invalid for "
            f"{n('protocol')}={setup.protocol} {n('benchmark')}={setup.benchmark}: expected some "
            f"of {', '.join(setup.algos)}."))
    for s in self.scenarios or ("",):
      if s not in paper_tables.SCENARIOS:
        raise errors.SettingError(lambda n: (
            f"{n('scenarios')}={','.join(self.scenarios)} is invalid: expected some of "
            f"{', '.join(paper_tables.SCENARIOS)}."))
    _check_ints("seeds", self.seeds, 0)
    if len(set(self.seeds)) != len(self.seeds):
      raise errors.SettingError(lambda n: (
          f"{n('seeds')}={','.join(map(str, self.seeds))} is invalid: expected distinct seeds."))
    if self.hidden is not None:
      _check_ints("hidden", self.hidden, 1)
    for name in ("epochs", "max_examples", "num_tasks"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise errors.SettingError.invalid(name, value, "an integer >= 1")
    most = paper_tables.BENCHMARKS[setup.benchmark].tasks_for(10)[1]  # MNIST's 10 classes
    if self.num_tasks is not None and most and self.num_tasks > most:
      raise errors.SettingError.invalid("num_tasks", self.num_tasks, f"1..{most}")
    if self.lam_factor is not None and not (math.isfinite(self.lam_factor)
                                             and self.lam_factor > 0):
      raise errors.SettingError.invalid("lam_factor", self.lam_factor, "a number > 0")
    if self.checkpoint_every < 0:
      raise errors.SettingError.invalid("checkpoint_every", self.checkpoint_every,
                                        "an integer >= 0 (0: only after each task)")


def _check_ints(name: str, values: tuple[int, ...], least: int) -> None:
  """A non-empty list of integers >= ``least`` (seeds >= 0, widths >= 1)."""
  if not values or any(v < least for v in values):
    allowed = "seeds >= 0." if name == "seeds" else f"integers >= {least}."
    raise errors.SettingError(lambda n: (
        f"{n(name)}={','.join(map(str, values))} is invalid: expected {allowed}"))
