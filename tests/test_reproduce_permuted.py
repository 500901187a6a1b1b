"""The reproduction's Permuted MNIST rows on van de Ven & Tolias' own inputs: 32x32 zero-padded
images (1024 inputs), every task permuted, PyTorch's initialisation (first-layer fan-in 1024),
and each seed of a row on its own permutations, built as ``experiments.permuted_mnist`` builds
them; a Split MNIST row still builds its tasks once for all its seeds. Tiny real runs on the
tiny MNIST of ``tests/tiny_tfds.py``."""

import dataclasses
import importlib
import json
import math

import jax
import numpy as np
import pytest

from ewc_jax.continual import sweep
from experiments import config as config_lib
from experiments import data
from experiments import paper_tables as tables
from experiments import protocols
from experiments import reproduce_runner as runner
from experiments import results_report as report
from experiments import results_store as store_lib
from experiments import train as train_lib

# The module (``ewc_jax.continual.programs`` is also a name the package exports).
programs = importlib.import_module("ewc_jax.continual.programs")
# A few iterations per task instead of the paper's 5,000; 2 tasks of 200 examples, one layer.
SETUP = dataclasses.replace(tables.VDV_PERMUTED, iterations=3)
OVER = runner.Overrides(hidden=(16,), max_examples=200, num_tasks=2)


@pytest.fixture(scope="module")
def ds(tiny_mnist_dir):
  return data.load_dataset("mnist", data_dir=tiny_mnist_dir)


def _recording_sweeps(monkeypatch):
  """``sweep.run`` recording each call's seeds, network, config and data, then running it."""
  calls, real = [], sweep.run

  def recording(configs, net, train, test, **kwargs):
    calls.append({"seeds": [c.seed for c in configs], "config": configs[0], "net": net,
                  "train": np.asarray(train.inputs), "test": np.asarray(test.inputs)})
    return real(configs, net, train, test, **kwargs)

  monkeypatch.setattr(sweep, "run", recording)
  return calls


def _command_line_tasks(ds, seed):
  """The tasks ``python -m experiments.permuted_mnist --pad=2 --permute_first --seed=<seed>
  --num_tasks=2 --max_examples=200 --scenario=domain`` trains on."""
  cfg = config_lib.make("permuted_mnist", pad=2, permute_first=True, seed=seed, num_tasks=2,
                        max_examples=200, scenario="domain")
  return train_lib.build_tasks(cfg, ds, cfg.run)


def test_the_vandeven_permuted_setup_is_their_inputs():
  assert tables.VDV_PERMUTED.build_options == {"pad": 2, "permute_first": True}
  assert tables.VDV_PERMUTED.init == "pytorch"
  # Split MNIST: the classes of each task are fixed, no builder options, our initialisation.
  assert tables.VDV_SPLIT.build_options == {} and tables.HSU_SPLIT.build_options == {}
  assert not tables.BENCHMARKS["split"].data_follows_seed
  assert tables.BENCHMARKS["permuted"].data_follows_seed
  assert runner.seed_groups(tables.VDV_PERMUTED, [0, 1, 2]) == [[0], [1], [2]]
  assert runner.seed_groups(tables.VDV_SPLIT, [0, 1, 2]) == [[0, 1, 2]]


def test_each_seed_of_a_permuted_row_has_its_own_permutations(ds, monkeypatch):
  """Two seeds of a row: two sweeps, each on the tasks the command line builds for that seed
  (different from each other); the record assembles both seeds in order."""
  calls = _recording_sweeps(monkeypatch)
  rec = runner.run_one(SETUP, "finetune", "domain", [0, 1], ds, overrides=OVER,
                       log=lambda *a, **k: None)
  assert [c["seeds"] for c in calls] == [[0], [1]]
  assert not np.array_equal(calls[0]["train"], calls[1]["train"])
  for call, seed in zip(calls, (0, 1)):
    built = _command_line_tasks(ds, seed)
    np.testing.assert_array_equal(call["train"], np.asarray(built.train.inputs))
    np.testing.assert_array_equal(call["test"], np.asarray(built.test.inputs))
    assert call["train"].shape[-1] == 1024

  acc = np.asarray(rec["acc_matrix"])
  assert acc.shape == (2, 2, 2) and rec["seeds"] == [0, 1]
  final = 100 * acc[:, -1, :].mean(-1)
  np.testing.assert_allclose(rec["average_accuracy"], final)
  assert rec["mean"] == pytest.approx(final.mean())
  assert rec["std"] == pytest.approx(final.std())
  assert rec["sem"] == pytest.approx(final.std(ddof=1) / math.sqrt(2))
  assert rec["inputs"] == {"num_inputs": 1024, "pad": 2, "permute_first": True,
                           "tasks_per_seed": True}
  assert rec["config"]["init"] == "pytorch" and rec["variant"].startswith("reduced[")
  assert rec["timings"]["total"] > 0 and len(rec["bwt"]) == 2
  # Seed 1 alone trains the same: its row of the record is its own run, on its own data.
  alone = runner.run_one(SETUP, "finetune", "domain", [1], ds, overrides=OVER,
                         log=lambda *a, **k: None)
  np.testing.assert_array_equal(alone["acc_matrix"][0], rec["acc_matrix"][1])


def test_vandeven_permuted_inputs_are_1024_task_1_permuted_fan_in_1024(ds, monkeypatch):
  built = runner.build_tasks(tables.VDV_PERMUTED, ds, "domain", 3,
                             overrides=runner.Overrides(max_examples=50, num_tasks=2))
  padded = protocols.pad_images(np.asarray(ds.train_images[:50]), 2).reshape(50, 1024)
  task1 = np.asarray(built.train.inputs[0, :50])
  assert task1.shape == (50, 1024) and not np.array_equal(task1, padded)  # permuted
  np.testing.assert_array_equal(np.sort(task1, axis=1), np.sort(padded, axis=1))
  assert not built.info["identity_first"] and built.info["num_inputs"] == 1024

  # The network and config a row trains: its first layer initialised with fan-in 1024.
  calls = _recording_sweeps(monkeypatch)
  runner.run_one(SETUP, "finetune", "domain", [3], ds, overrides=OVER,
                 log=lambda *a, **k: None)
  (call,) = calls
  cfg = call["config"]
  assert cfg.init == "pytorch"
  params, _ = programs._initial_variables(  # pylint: disable=protected-access
      cfg, call["net"], jax.random.key(0), call["train"][0, :1])
  kernels = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
             if getattr(path[-1], "key", None) == "kernel"]
  first = [np.asarray(k) for k in kernels if k.shape[0] == 1024]
  assert len(first) == 1 and first[0].shape == (1024, 16)
  bound = 1 / math.sqrt(1024)  # PyTorch's nn.Linear: uniform in ±1/√fan_in
  assert 0.95 * bound < np.abs(first[0]).max() <= bound
  assert np.abs(first[0]).max() < 1 / math.sqrt(784) * 0.9  # not fan-in 784


def test_a_split_row_builds_its_tasks_once(ds, monkeypatch):
  builds = []
  bench = tables.BENCHMARKS["split"]

  def counting(*args, **kwargs):
    builds.append(args[4])  # the seed
    return bench.build(*args, **kwargs)

  monkeypatch.setitem(runner.BENCHMARKS, "split", bench._replace(build=counting))
  calls = _recording_sweeps(monkeypatch)
  setup = dataclasses.replace(tables.VDV_SPLIT, iterations=3)
  rec = runner.run_one(setup, "finetune", "domain", [0, 1], ds, overrides=OVER,
                       log=lambda *a, **k: None)
  assert builds == [0] and [c["seeds"] for c in calls] == [[0, 1]]
  assert rec["inputs"] == {"num_inputs": 784, "tasks_per_seed": False}
  assert rec["config"]["init"] == "flax" and len(rec["average_accuracy"]) == 2


def test_a_permuted_row_resumes_from_each_seeds_checkpoint(ds, tmp_path):
  """Each seed's sweep checkpoints in its own folder; run again over the same folder, every
  seed restores its finished state instead of training, and the record is the same."""
  from ewc_jax import checkpoint  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "row"

  def saver(lines):
    return checkpoint.SweepCheckpointer(folder, {"record": "r", "seeds": [0, 1]},
                                        log=lines.append)

  first, again = [], []
  rec = runner.run_one(SETUP, "finetune", "domain", [0, 1], ds, overrides=OVER,
                       log=lambda *a, **k: None, checkpointer=saver(first))
  assert sorted(p.name for p in folder.iterdir()) == ["seed_0", "seed_1"]
  assert json.loads(json.dumps(rec["acc_matrix"])) == rec["acc_matrix"]
  resumed = runner.run_one(SETUP, "finetune", "domain", [0, 1], ds, overrides=OVER,
                           log=lambda *a, **k: None, checkpointer=saver(again))
  assert first == [] and len(again) == 2, again   # one "resuming" line per seed
  assert resumed["acc_matrix"] == rec["acc_matrix"]


def test_earlier_permuted_records_are_kept_apart_and_labelled(tmp_path):
  """A stored Permuted MNIST record without ``inputs`` (784 inputs, task 1 unpermuted, the first
  seed's permutations shared) becomes its own variant, never the key of the paper's inputs, and
  the markdown says so; the new rows show ± SEM beside the paper's."""
  old = {"protocol": "vandeven", "benchmark": "permuted", "scenario": "domain", "algo": "ewc",
         "reduced": False, "deviations": [], "variant": "full", "reset_optimizer": False,
         "steps_per_task": 5000}
  path = tmp_path / "r.json"
  path.write_text(json.dumps({"records": {"vandeven/permuted/full/domain/ewc": old}}))
  store = store_lib.load_store(path)
  (key, got), = store["records"].items()
  assert key == f"vandeven/permuted/reduced[{store_lib.EARLIER_INPUTS}]/domain/ewc"
  assert got["reduced"] and key != runner.row_key(tables.VDV_PERMUTED, runner.Overrides(),
                                                   "domain", "ewc")
  assert got["inputs"] == {"num_inputs": 784, "pad": 0, "permute_first": False,
                           "tasks_per_seed": False}
  store_lib.save(store, path)  # written back and read again: the same record, the same key
  assert store_lib.load_store(path)["records"] == {key: got}
  base = {"protocol": "vandeven", "benchmark": "permuted", "scenario": "domain", "algo": "ewc",
          "seeds": [0, 1, 2], "lam_paper": 500.0, "gamma_paper": 1.0, "lam": 500.0,
          "gamma": 1.0, "epochs": None, "steps_per_task": 5000, "reset_optimizer": False,
          "consolidated": "shared", "task_sizes": [60000] * 10, "hidden": [1000, 1000],
          "lr": 1e-4, "batch_size": 128, "fisher": "predicted",
          "average_accuracy": [94.0, 94.2, 94.4], "mean": 94.2, "std": 0.1633, "sem": 0.1155,
          "published": {"mean": 94.31, "err": 0.11, "err_kind": "sem", "runs": 20},
          "wall_seconds": 1.0}
  new = {**base, "reduced": False, "variant": "full", "deviations": [],
         "inputs": {"num_inputs": 1024, "pad": 2, "permute_first": True,
                    "tasks_per_seed": True}, "config": {"init": "pytorch"}}
  earlier = {**got, **base}
  md = report.render({"records": {"a": new, "b": earlier}})
  full, rest = md.split("— **REDUCED**")
  assert ("Ours: MLP 1024-1000-1000 (zero-padded by 2 pixels on each side, pixels / 255; every "
          "task a permutation of the 1024 padded pixels, each seed its own permutations) "
          "ReLU, PyTorch's default initialisation (weights and biases uniform in ±1/√fan_in), "
          "Adam lr 0.0001") in full
  assert "(one run per seed, each on its own tasks)" in full
  assert "| method | Domain-IL ours ± SEM | Domain-IL paper ± SEM |" in full
  assert "| EWC | 94.20 ± 0.12 | 94.31 ± 0.11 |" in full
  assert ("Ours: MLP 784-1000-1000 (pixels / 255; every task but the first a permutation of "
          "the 784 pixels, the first seed's permutations shared by all seeds) ReLU, Adam") in rest
  assert "(one vmapped run per row)" in rest
  assert store_lib.EARLIER_INPUTS in rest and "PyTorch" not in rest
