"""experiments.config (+ config_flags, benchmark): one frozen config, flags generated from it."""

import dataclasses
import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from ewc_jax import continual
from ewc_jax import errors
from experiments import task_sequences as benchmark
from experiments import config
from experiments import config_flags
from experiments import defaults

ROOT = Path(__file__).resolve().parents[1]


WITH_EXAMPLES = sorted(f"experiments.{p.stem}" for p in (ROOT / "experiments").glob("*.py")
                       if ">>>" in p.read_text())


def test_the_examples_found_include_the_config_modules():
  assert {"experiments.config", "experiments.config_flags", "experiments.defaults",
          "experiments.reproduce_config"} <= set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples(name):
  """Every module of experiments/ with a ``>>>`` example (the command-line mains have none)."""
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0, result


def test_make_takes_the_benchmark_defaults_then_the_fields():
  c = config.make("split_mnist")
  assert c.run.scenario == "task" and c.run.lam == defaults.DEFAULTS["split_mnist", "task"]["lam"]
  assert c.num_tasks == 5 and c.seed_list == (0,) and c.run.consolidate == "shared"
  d = config.make("split_mnist", scenario="domain", lam=7.0, epochs=None)
  assert d.run.lam == 7.0 and d.run.scenario == "domain" and d.run.epochs == 2  # None: unset
  s = config.make("permuted_mnist", steps_per_task=100)
  assert s.run.epochs is None and s.run.steps_per_task == 100
  assert s.run.reset_optimizer is False  # the permuted table
  assert config.make("split_mnist", penalty="seed").run.consolidate == "backbone"
  assert config.make("split_mnist", hidden=[8]).run.hidden == (8,)
  c.validate()
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.num_tasks = 3  # type: ignore[misc]


def test_make_refuses_unknown_and_exclusive_settings():
  with pytest.raises(TypeError, match="unknown settings lamda"):
    config.make("split_mnist", lamda=1.0)
  with pytest.raises(errors.SettingError) as err:
    config.make("split_mnist", epochs=1, steps_per_task=5)
  assert err.value.for_flags() == ("--epochs=1 and --steps_per_task=5 are exclusive: give the "
                                   "training length per task in epochs or in iterations.")
  with pytest.raises(errors.SettingError, match="`benchmark`='cifar' is invalid"):
    config.make("cifar")


@pytest.mark.parametrize("settings, flag_message", [
    ({"num_tasks": 6}, "--num_tasks=6 is invalid: expected an integer in 1..5."),
    ({"max_examples": 0}, "--max_examples=0 is invalid: expected an integer >= 1."),
    ({"seeds": (1, 1)}, "--seeds=1,1 is invalid: expected distinct seeds."),
    ({"input_norm": "z"}, "--input_norm='z' is invalid: expected one of none, mnist, "
     "per_channel."),
    ({"keep": 0}, "--keep=0 is invalid: expected an integer >= 1."),
    ({"checkpoint_every": -1}, "--checkpoint_every=-1 is invalid: expected an integer >= 0 "
     "(0: only after each task)."),
    ({"lam": -1.0}, "--lam=-1.0 is invalid: expected a finite number > 0."),
])
def test_validate_names_the_field(settings, flag_message):
  c = config.make("split_mnist", **settings)
  with pytest.raises(errors.SettingError) as err:
    c.validate()
  assert err.value.for_flags() == flag_message
  assert "--" not in str(err.value)  # the library spells fields, not flags


def test_checkpoint_identity_keys_are_kept():
  """Checkpoints written before the config redesign stay resumable: the same keys (split
  benchmarks add classes_per_task, which config.IDENTITY_ADDED has checkpoint.config_diff read
  as 2 where absent)."""
  from ewc_jax import checkpoint  # pylint: disable=import-outside-toplevel
  old_keys = ({"benchmark", "dataset", "num_tasks", "max_examples", "seeds", "input_norm"}
              | {f.name for f in dataclasses.fields(continual.Config)})
  ident = config.make("permuted_mnist", seeds=(0, 1)).identity("mnist:3.0.1")
  assert set(ident) == old_keys and ident["seeds"] == [0, 1] and ident["num_tasks"] == 10
  ident = config.make("split_mnist").identity("mnist:3.0.1")
  assert set(ident) == old_keys | {"classes_per_task"} and ident["num_tasks"] == 5
  old = {k: v for k, v in ident.items() if k != "classes_per_task"}
  added = config.IDENTITY_ADDED
  assert checkpoint.config_diff(old, ident, added=added) == []
  assert checkpoint.config_diff(old, dict(ident, classes_per_task=5), added=added) != []
  assert checkpoint.config_diff(old, ident) != []  # the library knows no experiments' key


def test_sweep_config_grid_and_checks():
  s = config.make_sweep("permuted_mnist", lam=(1.0, 10.0), p=(1.0, 2.0), seeds=(0, 1))
  assert s.experiment.run.validation_fraction == 0.1  # the sweep's default
  assert s.values == {"lam": (1.0, 10.0), "p": (1.0, 2.0), "gamma": (1.0,),
                      "lr": (s.experiment.run.lr,), "seed": (0, 1)}
  assert len(s.configs()) == 8 and s.experiment.run.lam == 1.0
  s.validate()
  assert config.make_sweep("split_mnist", validation_fraction=0.0).experiment.run \
      .validation_fraction == 0.0
  with pytest.raises(errors.SettingError) as err:
    config.make_sweep("split_mnist", lam=(1.0, 1.0)).validate()
  assert err.value.for_flags() == "--lam=1,1 is invalid: expected distinct values."
  with pytest.raises(errors.SettingError, match="expected at least one number"):
    config.make_sweep("split_mnist", lam=())
  with pytest.raises(errors.SettingError, match="`max_parallel`=0"):
    config.make_sweep("split_mnist", max_parallel=0).validate()


def test_every_field_becomes_one_flag_with_its_help():
  values = flags.FlagValues()
  config_flags.define(config.ExperimentConfig, flag_values=values,
                      per_benchmark=defaults.PER_BENCHMARK)
  fields = ({f.name for f in dataclasses.fields(config.ExperimentConfig)} - {"run"}
            | {f.name for f in dataclasses.fields(continual.Config)})
  assert set(values) == fields
  assert all(values[name].default is None for name in fields)  # None: not given
  assert "per benchmark and scenario" in values["lam"].help
  assert values["batch_size"].help.endswith("Default: 128.")
  assert isinstance(values["plots"], flags.BooleanFlag)
  values(["prog", "--lam=3", "--noplots", "--hidden=8,4", "--seeds=2,3", "--algo=l2"])
  assert config_flags.read(config.ExperimentConfig, flag_values=values) == {
      "lam": 3.0, "plots": False, "hidden": (8, 4), "seeds": (2, 3), "algo": "l2"}


def test_sweep_flags_shadow_the_run_fields_with_lists():
  values = flags.FlagValues()
  config_flags.define(config.SweepConfig, flag_values=values, defaults=config.SWEEP_DEFAULTS)
  assert values["lam"].help.endswith("A comma-separated list sweeps it.")
  assert "Default: 0.1." in values["validation_fraction"].help
  values(["prog", "--lam=1,10", "--max_parallel=2", "--hidden=a"])
  with pytest.raises(errors.SettingError) as err:
    config_flags.read(config.SweepConfig, flag_values=values)
  assert err.value.for_flags() == "--hidden=a is invalid: expected integers separated by commas."
  values["hidden"].value = None
  assert config_flags.read(config.SweepConfig, flag_values=values) == {
      "lam": (1.0, 10.0), "max_parallel": 2}


def test_benchmark_registry_builds_tasks():
  import numpy as np  # pylint: disable=import-outside-toplevel
  with pytest.raises(errors.SettingError, match="`benchmark`='nope' is invalid: expected one of"):
    benchmark.get("nope")
  rng = np.random.default_rng(0)
  from experiments import data  # pylint: disable=import-outside-toplevel
  images, labels = rng.integers(0, 255, (60, 4, 4, 1), dtype=np.uint8), np.arange(60) % 10
  ds = data.Dataset(images, labels, images[:20], labels[:20], "tiny", "1.0.0", 0.0, False)
  split = benchmark.get("split_mnist").build(ds, "task", 2, None, 0)
  assert split.class_groups == ((0, 1), (2, 3)) and split.train.inputs.shape[0] == 2
  perm = benchmark.get("permuted_mnist")
  a, b = perm.build(ds, "domain", 3, None, 0), perm.build(ds, "domain", 3, None, 1)
  assert perm.data_follows_seed and a.train.inputs.shape[:2] == (3, 60)
  np.testing.assert_array_equal(a.train.inputs[0], b.train.inputs[0])  # task 1: the identity
  assert not np.array_equal(a.train.inputs[1], b.train.inputs[1])       # then per-seed permutations


def test_shuffled_classes_follow_the_seed_and_only_split_benchmarks_take_them():
  import numpy as np  # pylint: disable=import-outside-toplevel
  from experiments import data  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  images, labels = rng.integers(0, 255, (60, 4, 4, 1), dtype=np.uint8), np.arange(60) % 10
  ds = data.Dataset(images, labels, images[:20], labels[:20], "tiny", "1.0.0", 0.0, False)
  split = benchmark.get("split_mnist")
  a, b = (split.build(ds, "task", 5, None, s, shuffle_classes=True) for s in (0, 1))
  assert a.class_groups != b.class_groups  # each seed its own pairs
  assert sorted(c for g in a.class_groups for c in g) == list(range(10))
  assert a.class_groups == split.build(ds, "task", 5, None, 0, shuffle_classes=True).class_groups
  assert [list(g) for g in a.class_groups] == [benchmark.class_order(10, 0, True)[i:i + 2]
                                               for i in range(0, 10, 2)]
  # task t's examples are those of its classes, labelled 0/1 in the group's order
  first = a.train.inputs[0][:a.train.counts[0]]
  want = images[np.isin(labels, a.class_groups[0])]
  np.testing.assert_array_equal(np.sort(first.reshape(len(first), -1), 0),
                                np.sort(want.reshape(len(want), -1), 0))
  got = np.asarray(a.train.labels[0][:a.train.counts[0]])
  assert sorted(got) == sorted(a.class_groups[0].index(v) for v in labels[np.isin(
      labels, a.class_groups[0])])
  c = config.make("split_mnist", shuffle_classes=True)
  assert c.data_follows_seed and c.build_options == {"shuffle_classes": True}
  assert not config.make("split_mnist").data_follows_seed
  with pytest.raises(errors.SettingError, match="shuffle_classes.*every task holds every class"):
    config.make("permuted_mnist", shuffle_classes=True).validate()


def test_train_and_evaluate_reads_no_flag(tiny_mnist_dir, tmp_path):
  """The runner works in a process that defined no flag at all (a library caller)."""
  code = f"""
import json, sys
from absl import flags
from experiments import config, train
c = config.make("split_mnist", num_tasks=2, max_examples=100, epochs=1, hidden=(8,), batch_size=32,
                algo="finetune", plots=False, progress=False, checkpoint=False,
                data_dir={tiny_mnist_dir!r})
rec = train.train_and_evaluate(c, {str(tmp_path)!r})
assert not {{"lam", "algo", "workdir", "num_tasks"}} & set(flags.FLAGS), list(flags.FLAGS)
print(json.dumps([rec["experiment"]["num_tasks"], len(rec["acc_matrix"])]))
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "[2, 2]"
  assert (tmp_path / "results.json").exists()
