"""The Split MNIST command line: a real-data smoke run, and one clear error per bad input."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli_batch

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "experiments.split_mnist", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, **(env or {})})


def test_real_data_smoke_two_tasks(real_data_dir, tmp_path):
  proc = run_cli("--algo=ewc", "--num_tasks=2", "--max_examples=300", "--epochs=2",
                 f"--data_dir={real_data_dir}", f"--workdir={tmp_path}", "--noprogress")
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "results.json").read_text())
  r = res["acc_matrix"]
  assert len(r) == 2 and len(r[0]) == 2
  assert r[0][0] > 0.9 and r[1][1] > 0.8  # 0 vs 1, then 2 vs 3, from 300 real examples each
  for key in ("average_accuracy", "bwt", "forgetting", "config", "timings", "curves"):
    assert key in res
  for key in ("import", "data", "compile", "train", "fisher", "eval", "total"):
    assert res["timings"][key] >= 0
  assert res["config"]["algo"] == "ewc" and res["benchmark"]["dataset"].startswith("mnist")
  assert res["curves"][1]["loss_reg"][0] > 0
  assert "after \\ on" in proc.stdout and "average accuracy" in proc.stdout


@pytest.mark.parametrize("flag,needle", [
    ("--lam=0", "--lam=0.0"),
    ("--lam=nan", "--lam=nan"),
    ("--p=-1", "--p=-1.0"),
    ("--algo=bogus", "--algo='bogus'"),
    ("--fisher=exact", "--fisher='exact'"),
    ("--penalty=weird", "--penalty='weird'"),
    ("--epochs=0", "--epochs=0"),
    ("--batch_size=-5", "--batch_size=-5"),
    ("--num_tasks=9", "--num_tasks=9"),
    ("--optimizer=adagrad", "--optimizer='adagrad'"),
])
def test_bad_flag_gives_one_line_and_exit_2(flag, needle, tmp_path):
  proc = run_cli(flag, f"--workdir={tmp_path / 'out'}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert needle in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "out" / "results.json").exists()


def test_missing_data_dir(tmp_path):
  """Without TensorFlow (the default install) a data_dir that holds no MNIST is refused at
  once, naming the flag. With it (the `prepare` extra) TFDS downloads into that folder instead:
  offline that is minutes of retries, so the check runs only where it means something."""
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("tensorflow is installed (`prepare` extra): TFDS would download into the folder")
  proc = run_cli(f"--data_dir={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'out'}",
                 env={"TFDS_DATA_DIR": ""})
  assert proc.returncode == 2
  assert "--data_dir=" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  proc = run_cli(f"--workdir={blocker / 'sub'}")
  assert proc.returncode == 2
  assert "--workdir=" in proc.stderr and "Traceback" not in proc.stderr


MORE_BAD_INPUTS = [  # (arguments, what the one error line must contain)
    (["--p=0"], "--p=0.0"),
    (["--p=nan"], "--p=nan"),
    (["--lam=-3"], "--lam=-3.0"),
    (["--lr=-1"], "--lr=-1.0"),
    (["--gamma=0"], "--gamma=0.0"),
    (["--gamma=1.5"], "--gamma=1.5"),
    (["--gamma=nan"], "--gamma=nan"),
    (["--scenario=bogus"], "--scenario='bogus'"),
    (["--dataset=bogus_dataset_xyz"], "--dataset='bogus_dataset_xyz'"),
    (["--dataset=mnist:9.9.9"], "--dataset='mnist:9.9.9'"),
    (["--num_tasks=2", "--max_examples=400", "--batch_size=401"], "--batch_size=401"),
    (["--fisher_batch_size=0"], "--fisher_batch_size=0"),
    (["--max_examples=0"], "--max_examples=0"),
    (["--hidden=a"], "--hidden=a"),
    (["--seeds=1,1"], "--seeds=1,1"),
    (["--keep=0"], "--keep=0"),
    (["--checkpoint_every=-1"], "--checkpoint_every=-1"),
    (["--chunk_steps=0"], "--chunk_steps=0"),
    (["--epochs=3", "--steps_per_task=10"], "--epochs=3 and --steps_per_task=10 are exclusive"),
    (["--steps_per_task=0"], "--steps_per_task=0"),
    (["--consolidate=heads"], "--consolidate='heads'"),
    (["--validation_fraction=1"], "--validation_fraction=1.0"),
    (["--validation_fraction=-0.5"], "--validation_fraction=-0.5"),
    (["--epochs=abc"], "--epochs=abc"),          # absl parse errors: one line, status 2 too
    (["--bogus_flag=1"], "bogus_flag"),
    (["--data_dir=" + __file__], "--data_dir="),  # a file, not a folder
    # Divergence is not a bad input: status 3, one line naming task, step and loss part.
    (["--num_tasks=2", "--max_examples=100", "--batch_size=16", "--hidden=16", "--lr=1e30"],
     "at task 1/2, epoch 1, step 2/7: loss_cls"),
]


def test_more_bad_inputs_one_line_exit_2_nothing_written(tiny_mnist_dir, tmp_path):
  """One process runs every case (tests/cli_batch.py): each is refused before any work (or, for
  the diverging run, stopped before anything is written)."""
  jobs = []
  for i, (args, _) in enumerate(MORE_BAD_INPUTS):
    data = [] if any(a.startswith("--data_dir") for a in args) else [f"--data_dir={tiny_mnist_dir}"]
    jobs.append([*args, *data, f"--workdir={tmp_path / str(i)}", "--noprogress", "--noplots"])
  if os.geteuid() != 0:  # root reads everything: an unreadable folder cannot be made
    locked = tmp_path / "locked"
    locked.mkdir(mode=0)
    jobs.append([f"--data_dir={locked}", f"--workdir={tmp_path / 'locked_out'}"])
  results = cli_batch.run_batch(jobs, tmp_path)
  needles = [n for _, n in MORE_BAD_INPUTS] + ["--data_dir="] * (len(jobs) - len(MORE_BAD_INPUTS))
  for job, res, needle in zip(jobs, results, needles):
    errors = [l for l in res["stderr"].splitlines() if l.startswith("error: ")]
    assert res["code"] == (3 if "--lr=1e30" in job else 2), (job, res["code"], res["stderr"])
    assert len(errors) == 1 and needle in errors[0], (job, res["stderr"][-2000:])
    assert "Traceback" not in res["stderr"]
  for folder in tmp_path.iterdir():
    if folder.is_dir():
      assert not (folder / "results.json").exists() and not (folder / "checkpoints").exists()


def test_defaults_follow_benchmark_and_scenario(tiny_mnist_dir, tmp_path):
  """Flags left unset take experiments/defaults.py's values for the benchmark and scenario;
  a flag given on the command line wins; the resolved values are stored in results.json."""
  from experiments import defaults  # pylint: disable=import-outside-toplevel
  common = ["--num_tasks=2", "--max_examples=200", "--noprogress", "--noplots",
            "--nocheckpoint", f"--data_dir={tiny_mnist_dir}"]
  runs = {
      "permuted": ("experiments.permuted_mnist", [], ("permuted_mnist", "domain")),
      "split_class": ("experiments.split_mnist", ["--scenario=class"], ("split_mnist", "class")),
      "override": ("experiments.split_mnist", ["--scenario=domain", "--lam=7", "--epochs=1"],
                   ("split_mnist", "domain")),
  }
  for name, (module, args, key) in runs.items():
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", module, *common, *args, f"--workdir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["scenario"] == key[1] and config["consolidate"] == "shared"
    expected = dict(defaults.DEFAULTS[key])
    if name == "override":
      expected.update(lam=7.0, epochs=1, steps_per_task=None)
    for field, value in expected.items():
      value = list(value) if isinstance(value, tuple) else value
      assert config[field] == value, (name, field, config[field], value)


def test_outputs_get_the_mode_of_a_plain_open(tmp_path):
  from experiments import files  # pylint: disable=import-outside-toplevel
  target = tmp_path / "out.json"
  files.write_atomic(target, lambda f: f.write(b"{}"))
  plain = tmp_path / "plain.json"
  plain.write_bytes(b"{}")
  assert (target.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)


def test_input_norm_mnist_is_torchvisions_normalisation_and_is_recorded(tiny_mnist_dir, tmp_path):
  """--input_norm=mnist feeds (x/255 − 0.1307)/0.3081 (Avalanche's MNIST inputs): a different
  run from the default [0, 1] inputs, recorded in results.json; a bad value exits 2."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from experiments import input_norm  # pylint: disable=import-outside-toplevel
  x = np.array([[0, 255, 51]], np.uint8)
  np.testing.assert_allclose(np.asarray(input_norm.mnist_normalize(x)),
                             (x / 255.0 - 0.1307) / 0.3081, rtol=1e-6)
  common = ("--algo=finetune", "--num_tasks=2", "--max_examples=200", "--epochs=1",
            "--hidden=16", "--noplots", "--nocheckpoint", f"--data_dir={tiny_mnist_dir}")
  recs = {}
  for norm in ("none", "mnist"):
    proc = run_cli(*common, f"--input_norm={norm}", f"--workdir={tmp_path / norm}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs[norm] = json.loads((tmp_path / norm / "results.json").read_text())
    assert recs[norm]["benchmark"]["input_norm"] == norm
  assert recs["none"]["acc_matrix"] != recs["mnist"]["acc_matrix"]
  proc = run_cli(*common, "--input_norm=zscore", f"--workdir={tmp_path / 'bad'}")
  assert proc.returncode == 2 and "--input_norm='zscore' is invalid" in proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "bad" / "results.json").exists()


def test_a_warm_run_loads_its_compiled_programs_and_gives_the_same_results(tiny_mnist_dir,
                                                                         tmp_path):
  """The first run saves its compiled programs under the cache folder; a second one with
  another λ (an argument of the programs) loads them (train_chunk is not traced again: JAX logs
  every trace) and writes the numbers of the same run made with --nocompile_cache, which reads
  and saves nothing."""
  env = {"EWC_JAX_CACHE_DIR": str(tmp_path / "cache"), "JAX_LOG_COMPILES": "1"}
  common = ("--algo=ewc", "--num_tasks=2", "--max_examples=200", "--epochs=1", "--hidden=23",
            "--noplots", "--nocheckpoint", "--noprogress", f"--data_dir={tiny_mnist_dir}")
  recs, logs = [], []
  for i, extra in enumerate((["--lam=10"], ["--lam=1000"], ["--lam=1000", "--nocompile_cache"])):
    proc = run_cli(*common, *extra, f"--workdir={tmp_path / str(i)}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs.append(json.loads((tmp_path / str(i) / "results.json").read_text()))
    logs.append(proc.stderr)
    assert len(list((tmp_path / "cache" / "executables").glob("*.executables"))) == 1
  assert "Finished tracing train_chunk" in logs[0] and "Finished tracing train_chunk" in logs[2]
  assert "Finished tracing train_chunk" not in logs[1]
  assert recs[1]["acc_matrix"] == recs[2]["acc_matrix"] and recs[1]["curves"] == recs[2]["curves"]
  assert recs[0]["curves"] != recs[1]["curves"]  # λ reached the loaded programs
  # Another key (another setting) on the same persistent cache: the small programs that tracing
  # runs eagerly come from that cache, the run's own programs are compiled afresh and saved
  # (a hit of the former must not stop the save), so the next run loads them.
  for i in (3, 4):
    proc = run_cli(*common[:4], "--epochs=2", *common[5:], "--lam=1000",
                   f"--workdir={tmp_path / str(i)}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "cache" / "executables").glob("*.executables"))) == 2
    assert ("Finished tracing train_chunk" in proc.stderr) == (i == 3)
