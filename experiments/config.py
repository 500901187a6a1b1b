"""The experiment configs: one frozen, typed object per run, the continual-learning config nested.

Every setting is declared here once, as a dataclass field with its ``metadata["help"]``
(:class:`ExperimentConfig` for the run around the protocol, :class:`ewc_jax.continual.Config`
for the protocol itself, :class:`SweepConfig` for a sweep); the command lines generate their
flags from the fields (:mod:`experiments.config_flags`), and
:func:`experiments.train.train_and_evaluate` takes the config and a workdir and reads no flag.

:func:`make` is how to build one: settings not given take the defaults measured for the
benchmark and scenario (:mod:`experiments.defaults`), then the dataclasses' defaults.

    >>> from experiments import config
    >>> c = config.make("permuted_mnist", seeds=(0, 1))
    >>> c.run.scenario, c.run.lam, c.num_tasks, c.seed_list
    ('domain', 30.0, 10, (0, 1))
    >>> c.validate()
    >>> config.make("split_mnist", lam=10.0).run.lam
    10.0
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from ewc_jax import continual
from ewc_jax import errors
from ewc_jax.continual import sweep
from experiments import defaults
from experiments import input_norm
from experiments import task_sequences as benchmark_lib


def setting(default: Any, help_text: str) -> Any:
  """A config field with its description (the flag's help)."""
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """One experiment: a benchmark, its data, seeds and outputs, and the protocol (``run``)."""
  benchmark: str = setting(
      "split_mnist", "Task sequence: " + " | ".join(benchmark_lib.BENCHMARKS) + ".")
  dataset: str | None = setting(
      None, "Any TFDS image-classification dataset, any HxWxC and number of classes (mnist, "
      "fashion_mnist, kmnist, cifar10, cifar100, ...). Default: the benchmark's (mnist; "
      "cifar10 for split_cifar).")
  data_dir: str | None = setting(
      None, "TFDS data_dir (default: $TFDS_DATA_DIR, else ../shared/tensorflow_datasets when "
      "present, else TFDS's default).")
  manual_dir: str | None = setting(
      None, "Folder with the raw dataset files, to prepare the dataset offline when data_dir "
      "does not hold it (needs tensorflow-cpu).")
  num_tasks: int | None = setting(
      None, "Number of tasks (default: every group of classes of a split benchmark, e.g. 5 for "
      "Split MNIST; 10 for Permuted MNIST).")
  classes_per_task: int | None = setting(
      None, "Split benchmarks: classes per task (default: 2 for a 10-class dataset, else 10; "
      "e.g. 5 for Split CIFAR-100 in 20 tasks).")
  max_examples: int | None = setting(
      None, "Keep at most N train and N test examples per task (quick checks; default: all).")
  pad: int = setting(
      0, "Permuted benchmarks: zero-pad every image by N pixels on each side before its pixels "
      "are permuted, so the permutations mix the padding in (van de Ven & Tolias 2019: 2, "
      "MNIST's 28x28 -> 32x32, 1024 inputs; with init=pytorch the first layer's fan-in is then "
      "1024, as in their code).")
  permute_first: bool = setting(
      False, "Permuted benchmarks: permute task 1 too, so every task is permuted (van de Ven & "
      "Tolias 2019's runs: their code leaves task 1 unpermuted only for seed 0, and their "
      "compare scripts start at seed 1); default: task 1 is the identity.")
  shuffle_classes: bool = setting(
      False, "Split benchmarks: assign the classes to tasks in a random order drawn from the "
      "seed (van de Ven's code shuffles the digits before pairing them, for every seed but 0, "
      "so each seed has its own pairs); default: consecutive classes, {0,1}, {2,3}, ...")
  seeds: tuple[int, ...] = setting(
      (), "Several seeds (e.g. 0,1,2): one run each, mean ± std (default: the one seed).")
  input_norm: str | None = setting(
      None, "Input scaling: none (pixels / 255, in [0, 1]) | mnist ((pixels / 255 - 0.1307) / "
      "0.3081: torchvision's MNIST normalisation, as in Avalanche's benchmarks) | per_channel "
      "(each channel's mean and std over the training split). Default: the benchmark's (none; "
      "per_channel for split_cifar).")
  plots: bool = setting(True, "Write the PNG plots.")
  progress: bool = setting(True, "Show a progress bar per task.")
  tensorboard: bool = setting(
      False, "Write TensorBoard scalars while training (per epoch: train loss parts and "
      "accuracy; per task: test accuracy of every task seen, average accuracy, validation "
      "average accuracy) under <workdir>/tensorboard/seed_<s>.")
  compile_cache: bool = setting(True, "Use JAX's persistent compilation cache, and load a run's "
                                "compiled programs saved by an earlier run of the same settings "
                                "and code (nothing traced).")
  checkpoint: bool = setting(
      True, "Save the run state after every task (and every checkpoint_every steps) under "
      "<workdir>/checkpoints, and resume from it. False: no saves, no resume (no orbax import "
      "either).")
  resume: bool = setting(
      True, "Continue from the newest complete checkpoint in <workdir>/checkpoints when there "
      "is one (re-running the same command does this); false refuses to run over existing "
      "checkpoints.")
  force_restart: bool = setting(
      False, "Discard the checkpoints in <workdir>/checkpoints and start over (also when they "
      "come from another configuration).")
  checkpoint_every: int = setting(
      0, "Also checkpoint within a task every N train steps (rounded up to whole chunks, see "
      "chunk_steps); 0: only after each task.")
  keep: int = setting(2, "Number of newest checkpoints kept (>= 1).")
  run: continual.Config = continual.Config()

  @functools.cached_property
  def bench(self) -> benchmark_lib.Benchmark:
    """The task sequence ``benchmark`` names (looked up once per config)."""
    return benchmark_lib.get(self.benchmark)

  @property
  def dataset_name(self) -> str:
    """``dataset``, or the benchmark's."""
    return self.dataset or self.bench.dataset

  @property
  def input_norm_name(self) -> str:
    """``input_norm``, or the benchmark's."""
    return self.input_norm or self.bench.input_norm

  @property
  def known_classes(self) -> int | None:
    """The dataset's number of classes when known before loading it."""
    return benchmark_lib.KNOWN_CLASSES.get(self.dataset_name)

  @property
  def task_count(self) -> int:
    """``num_tasks``, or the benchmark's default for the dataset (see :meth:`resolved`)."""
    if self.num_tasks is not None:
      return self.num_tasks
    if self.known_classes is None:
      raise ValueError(f"num_tasks depends on the number of classes of {self.dataset_name!r}: "
                       "call resolved(num_classes) once the dataset is loaded.")
    return self.bench.tasks_for(self.known_classes, self.classes_per_task)[0]

  def resolved(self, num_classes: int) -> "ExperimentConfig":
    """Every default that depends on the dataset made concrete (dataset, input_norm,
    num_tasks, classes_per_task), for a dataset of ``num_classes`` classes, after the checks
    that depend on it (the task counts; :meth:`validate` has checked the rest)."""
    self._check_counts(num_classes)
    bench = self.bench
    per = (bench.classes_per_task_for(num_classes, self.classes_per_task) if bench.split
           else None)
    tasks = self.num_tasks if self.num_tasks is not None else bench.tasks_for(num_classes,
                                                                              per)[0]
    return dataclasses.replace(self, dataset=self.dataset_name, input_norm=self.input_norm_name,
                               num_tasks=tasks, classes_per_task=per)

  @property
  def build_options(self) -> dict:
    """The benchmark builder's extra keyword arguments (permuted benchmarks: ``pad``,
    ``permute_first``; split benchmarks: ``shuffle_classes``)."""
    if self.bench.split:
      return {"shuffle_classes": bool(self.shuffle_classes)}
    return {"pad": self.pad, "permute_first": bool(self.permute_first)}

  @property
  def data_follows_seed(self) -> bool:
    """Whether the tasks' data depend on the seed (Permuted MNIST's permutations, or shuffled
    class pairs), so a sweep trains each seed on its own data."""
    return self.bench.data_follows_seed or (self.bench.split and bool(self.shuffle_classes))

  @property
  def seed_list(self) -> tuple[int, ...]:
    """The seeds run one after another: ``seeds``, or ``(run.seed,)``."""
    return tuple(self.seeds) if self.seeds else (self.run.seed,)

  def validate(self, num_classes: int | None = None) -> None:
    """Raises :class:`ewc_jax.errors.SettingError` naming the first bad field. ``num_classes``:
    the dataset's (default: :attr:`known_classes`; unknown: the task counts are checked once
    the dataset is loaded)."""
    self.run.validate()
    bench = self.bench
    input_norm.check(self.input_norm_name)
    if len(set(self.seed_list)) != len(self.seed_list):
      seeds = ",".join(map(str, self.seed_list))
      raise errors.SettingError(
          lambda n: f"{n('seeds')}={seeds} is invalid: expected distinct seeds.")
    if self.run.augment != "none" and not bench.split:
      _invalid("augment", self.run.augment, f"none for {bench.name} (its inputs are permuted "
               "vectors, not images)")
    if not _is_int(self.pad) or self.pad < 0:
      _invalid("pad", self.pad, "an integer >= 0")
    if bench.split and (self.pad or self.permute_first):
      name, value = ("pad", self.pad) if self.pad else ("permute_first", self.permute_first)
      _invalid(name, value, f"{'0' if name == 'pad' else 'false'} for {bench.name} (pixels are "
               "padded and permuted only by permuted benchmarks)")
    if not bench.split and self.shuffle_classes:
      _invalid("shuffle_classes", self.shuffle_classes,
               f"false for {bench.name} (every task holds every class)")
    if self.max_examples is not None and (not _is_int(self.max_examples)
                                          or self.max_examples < 1):
      _invalid("max_examples", self.max_examples, "an integer >= 1")
    if not _is_int(self.keep) or self.keep < 1:
      _invalid("keep", self.keep, "an integer >= 1")
    if not _is_int(self.checkpoint_every) or self.checkpoint_every < 0:
      _invalid("checkpoint_every", self.checkpoint_every, "an integer >= 0 (0: only after each "
               "task)")
    self._check_counts(self.known_classes if num_classes is None else num_classes)

  def _check_counts(self, num_classes: int | None) -> None:
    """The rules on classes per task and tasks, for ``num_classes`` (None: unknown yet)."""
    bench = self.bench
    if self.classes_per_task is not None:
      per = self.classes_per_task
      if not bench.split:
        _invalid("classes_per_task", per, f"unset for {bench.name} (every task has every "
                 "class)")
      if not _is_int(per) or per < 1 or (num_classes is not None and per > num_classes):
        _invalid("classes_per_task", per, "an integer in 1.." + str(num_classes or "C"))
    most = None if num_classes is None else bench.tasks_for(num_classes, self.classes_per_task)[1]
    n = self.num_tasks if (self.num_tasks is not None or num_classes is None) else (
        bench.tasks_for(num_classes, self.classes_per_task)[0])
    if n is not None and (not _is_int(n) or n < 1 or (most is not None and n > most)):
      allowed = f"1..{most}" if most else ">= 1"
      _invalid("num_tasks", n, f"an integer in {allowed}")

  def identity(self, dataset: str) -> dict:
    """What a run's checkpoints must come from (``dataset``: ``"<name>:<version>"``; keys
    added since checkpoints were written: :data:`IDENTITY_ADDED`)."""
    split = {"classes_per_task": self.classes_per_task} if self.bench.split else {}
    return {"benchmark": self.benchmark, "dataset": dataset, "num_tasks": self.task_count,
            **split, **_set_options(self), "max_examples": self.max_examples,
            "seeds": list(self.seed_list),
            "input_norm": self.input_norm_name, **dataclasses.asdict(self.run)}


# Identity keys added after checkpoints were written, with the value those checkpoints ran with
# (classes_per_task: every split checkpoint before it was Split MNIST, 2 classes per task); the
# checkpointers take it as ``added``.
IDENTITY_ADDED = {"classes_per_task": 2}

SWEPT = continual.HYPER_FIELDS  # the Config fields a sweep takes lists of (and seeds)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """A sweep: every combination of the listed values (and seeds) around one experiment.

  ``experiment.run`` holds the first value of each swept setting; an empty tuple sweeps nothing
  (the experiment's value).
  """
  experiment: ExperimentConfig = ExperimentConfig()
  lam: tuple[float, ...] = setting((), "A comma-separated list sweeps it.")
  p: tuple[float, ...] = setting((), "A comma-separated list sweeps it.")
  gamma: tuple[float, ...] = setting((), "A comma-separated list sweeps it.")
  lr: tuple[float, ...] = setting((), "A comma-separated list sweeps it.")
  max_parallel: int | None = setting(
      None, "Train at most N configs at a time (padding to a multiple of the devices "
      "included); default: all at once.")
  vectorize: bool | None = setting(
      None, "vmap the configs (every operation batched: what an accelerator needs; each config "
      "equals its single run to float tolerance) or, with --novectorize, map them (one after "
      "another in one program, each the single run bit for bit; one device). Default: map on "
      "one CPU device, vmap otherwise.")
  distributed: bool = setting(
      False, "Multi-host: call jax.distributed.initialize() first (one process per host, all "
      "with the same flags); the config axis is then sharded over every device of every host. "
      "Process 0 writes the outputs.")
  coordinator_address: str | None = setting(
      None, "With distributed: host:port of process 0 (default: auto-detected by JAX on "
      "managed clusters).")
  num_processes: int | None = setting(None, "With distributed: number of processes.")
  process_id: int | None = setting(None, "With distributed: this process's index.")

  @property
  def values(self) -> dict[str, tuple]:
    """``{setting: values}`` of the grid: each swept Config field, then ``seed``."""
    run = self.experiment.run
    out = {name: tuple(getattr(self, name)) or (getattr(run, name),) for name in SWEPT}
    out["seed"] = self.experiment.seed_list
    return out

  def configs(self) -> list[continual.Config]:
    """Every combination, as :class:`ewc_jax.continual.Config` (seed varies fastest)."""
    return sweep.grid(self.experiment.run, **self.values)

  def validate(self) -> None:
    """The experiment's checks, then each list and every config of the grid."""
    self.experiment.validate()
    for name in SWEPT:
      values = tuple(getattr(self, name))
      if len(set(values)) != len(values):
        text = ",".join(f"{v:g}" for v in values)
        raise errors.SettingError(
            lambda n, name=name, text=text: f"{n(name)}={text} is invalid: expected distinct "
            "values.")
    if self.max_parallel is not None and (not _is_int(self.max_parallel) or self.max_parallel < 1):
      _invalid("max_parallel", self.max_parallel, "an integer >= 1")
    sweep.validate(self.configs())

  def identity(self, dataset: str) -> dict:
    """What the sweep's checkpoints must come from: the grid and every shared setting."""
    e = self.experiment
    split = {"classes_per_task": e.classes_per_task} if e.bench.split else {}
    return {"benchmark": e.benchmark, "dataset": dataset, "num_tasks": e.task_count, **split,
            **_set_options(e), "max_examples": e.max_examples, "input_norm": e.input_norm_name,
            "values": {n: list(v) for n, v in self.values.items()},
            "base_config": dataclasses.asdict(e.run), "max_parallel": self.max_parallel}


EXPERIMENT_FIELDS = tuple(f.name for f in dataclasses.fields(ExperimentConfig) if f.name != "run")
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(continual.Config))
SWEEP_FIELDS = tuple(f.name for f in dataclasses.fields(SweepConfig) if f.name != "experiment")
# A sweep ranks its configs on a validation split: it holds out 10% unless told otherwise.
SWEEP_DEFAULTS = {"validation_fraction": 0.1}


def make(benchmark: str = "split_mnist", **settings: Any) -> ExperimentConfig:
  """The experiment config of ``benchmark`` with ``settings`` (fields of
  :class:`ExperimentConfig` or of :class:`ewc_jax.continual.Config`, by name).

  A setting that is absent or None takes the default of the benchmark and scenario
  (:mod:`experiments.defaults`), else the dataclass default. ``epochs`` and ``steps_per_task``
  are exclusive; giving one drops the other's default. ``consolidate`` is resolved
  (``Config.consolidated``). Not validated: call ``validate()``.
  """
  bench = benchmark_lib.get(benchmark)
  unknown = sorted(set(settings) - set(EXPERIMENT_FIELDS) - set(RUN_FIELDS) - {"benchmark"})
  if unknown:
    raise TypeError(f"make() got unknown settings {', '.join(unknown)}: expected fields of "
                    "ExperimentConfig or ewc_jax.continual.Config.")
  given = {k: v for k, v in settings.items() if v is not None and k != "benchmark"}
  run = {k: v for k, v in given.items() if k in RUN_FIELDS}
  scenario = run.get("scenario", bench.default_scenario)
  if "epochs" in run and "steps_per_task" in run:
    epochs, steps = run["epochs"], run["steps_per_task"]
    raise errors.SettingError(lambda n: (
        f"{n('epochs')}={epochs} and {n('steps_per_task')}={steps} are exclusive: give the "
        "training length per task in epochs or in iterations."))
  table = defaults.for_run(benchmark, scenario, run.get("backbone"))
  if "epochs" in run or "steps_per_task" in run:
    table.pop("epochs", None)
    table.pop("steps_per_task", None)
  fields = {**table, **run, "scenario": scenario}
  if "steps_per_task" in fields and "epochs" not in fields:
    fields["epochs"] = None
  if "hidden" in fields:
    fields["hidden"] = tuple(fields["hidden"])
  fields.setdefault("consolidate",
                    continual.Config(penalty=fields.get("penalty", "standard")).consolidated)
  experiment = {k: v for k, v in given.items() if k in EXPERIMENT_FIELDS}
  experiment.setdefault("dataset", bench.dataset)
  experiment.setdefault("input_norm", bench.input_norm)
  classes = benchmark_lib.KNOWN_CLASSES.get(experiment["dataset"])
  if classes is not None:  # else resolved once the dataset is loaded (ExperimentConfig.resolved)
    if bench.split:
      experiment.setdefault("classes_per_task",
                            bench.classes_per_task_for(classes, experiment.get("classes_per_task")))
    experiment.setdefault("num_tasks",
                          bench.tasks_for(classes, experiment.get("classes_per_task"))[0])
  if "seeds" in experiment:
    experiment["seeds"] = tuple(experiment["seeds"])
  return ExperimentConfig(benchmark=benchmark, run=continual.Config(**fields), **experiment)


def make_sweep(benchmark: str = "split_mnist", **settings: Any) -> SweepConfig:
  """The sweep config: ``settings`` as in :func:`make`, plus :class:`SweepConfig`'s fields;
  ``lam``/``p``/``gamma``/``lr`` may be sequences (a single value: not swept). The experiment
  holds the first value of each list; :data:`SWEEP_DEFAULTS` apply unless given.

      >>> from experiments import config
      >>> s = config.make_sweep("split_mnist", lam=(10.0, 1000.0), seeds=(0, 1))
      >>> s.values["lam"], s.values["seed"], len(s.configs()), s.experiment.run.lam
      ((10.0, 1000.0), (0, 1), 4, 10.0)
  """
  sweep_fields = {k: settings.pop(k) for k in SWEEP_FIELDS if k in settings and k not in SWEPT}
  lists = {}
  for name in SWEPT:
    value = settings.get(name)
    if value is not None and not isinstance(value, (int, float)):
      lists[name] = tuple(value)
      if not lists[name]:
        raise errors.SettingError(
            lambda n, name=name: f"{n(name)}= is invalid: expected at least one number.")
      settings[name] = lists[name][0]
  for name, value in SWEEP_DEFAULTS.items():
    if settings.get(name) is None:
      settings[name] = value
  sweep_fields = {k: v for k, v in sweep_fields.items() if v is not None}
  return SweepConfig(experiment=make(benchmark, **settings), **lists, **sweep_fields)


def _set_options(e: ExperimentConfig) -> dict:
  """The builder options that differ from their defaults (a checkpoint identity names only
  those, so runs without them keep the identity they had)."""
  return {k: v for k, v in e.build_options.items() if v}


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _invalid(name: str, value: Any, allowed: str):
  raise errors.SettingError.invalid(name, value, allowed)
