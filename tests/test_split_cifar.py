"""experiments.split_cifar end to end on tiny CIFAR-shaped datasets written by the tests, and
any TFDS image dataset through the benchmark registry."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cli_batch
import pause

ROOT = Path(__file__).resolve().parents[1]
QUICK = ("--epochs=1", "--hidden=32", "--batch_size=32", "--noplots", "--noprogress",
         "--nocheckpoint")


def run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)


# Split CIFAR's defaults (the reduced ResNet-18 with BatchNorm, crop + flip), made small.
RESNET = ("--width=4", "--epochs=1", "--batch_size=50", "--noplots", "--noprogress")


@pytest.mark.extended
def test_split_cifar10_resnet18_killed_and_resumed_is_bit_identical(tiny_cifar_dir, tmp_path):
  """The default command (ResNet-18 with BatchNorm, crop + flip, per-channel inputs) on tiny
  CIFAR-10 end to end; SIGKILL in the middle of task 2 (running statistics and augmentation
  draws half-way), then the same command: the same numbers as the uninterrupted run, to the
  bit."""
  common = ("--algo=ewc", *RESNET, "--num_tasks=2", "--batch_size=10",  # 100 examples a task
            "--chunk_steps=5", "--checkpoint_every=5", f"--data_dir={tiny_cifar_dir}")
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  full = run("experiments.split_cifar", *common, f"--workdir={tmp_path / 'full'}")
  assert full.returncode == 0, full.stderr[-3000:]
  work = tmp_path / "killed"
  at = "1:0:5"  # task 2, epoch 1, after its first chunk's checkpoint
  marker = pause.marker_path(work, at)
  cmd = [sys.executable, "-m", "experiments.split_cifar", *common, f"--workdir={work}"]
  proc = pause.start_paused(cmd, {**env, **pause.pause_env(at, marker)}, at, marker,
                            timeout=600)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  again = run("experiments.split_cifar", *common, f"--workdir={work}")
  assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-3000:]
  a, b = (json.loads((w / "results.json").read_text()) for w in (tmp_path / "full", work))
  assert a["acc_matrix"] == b["acc_matrix"] and a["curves"] == b["curves"]
  assert a["config"]["backbone"] == "resnet18" and a["config"]["augment"] == "crop_flip"
  assert a["config"]["width"] == 4 and a["benchmark"]["input_norm"] == "per_channel"
  assert np.asarray(a["acc_matrix"]).shape == (2, 2)
  assert a["curves"][1]["loss_reg"][0] > 0  # EWC's penalty acts from task 2 on


def test_split_cifar10_five_tasks_normalised_per_channel(tiny_cifar_dir, tmp_path):
  proc = run("experiments.split_cifar", "--algo=ewc", "--backbone=mlp", "--augment=none",
             *QUICK, f"--data_dir={tiny_cifar_dir}", f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "results.json").read_text())
  bench = res["benchmark"]
  assert bench["name"] == "split_cifar" and bench["dataset"].startswith("cifar10:")
  assert bench["class_groups"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
  assert bench["image_shape"] == [32, 32, 3] and bench["num_classes"] == 10
  assert bench["input_norm"] == "per_channel" and len(bench["input_stats"]["mean"]) == 3
  assert np.asarray(res["acc_matrix"]).shape == (5, 5)
  assert np.mean(np.diag(res["acc_matrix"])) > 0.8  # each task's prototypes are learnable
  assert res["experiment"]["classes_per_task"] == 2


@pytest.mark.extended
def test_split_cifar100_in_20_tasks_and_its_limits(tiny_cifar_dir, tmp_path):
  proc = run("experiments.split_cifar", "--dataset=cifar100", "--classes_per_task=5",
             "--num_tasks=3", "--backbone=mlp", "--augment=none", *QUICK,
             f"--data_dir={tiny_cifar_dir}", f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "results.json").read_text())
  assert res["benchmark"]["class_groups"] == [list(range(5 * t, 5 * t + 5)) for t in range(3)]
  jobs = [["--dataset=cifar100", "--classes_per_task=5", "--num_tasks=21"],
          ["--dataset=cifar100", "--classes_per_task=101"],
          ["--num_tasks=6"], ["--augment=rotate"]]
  results = cli_batch.run_batch(
      [[*job, *QUICK, f"--data_dir={tiny_cifar_dir}", f"--workdir={tmp_path / str(i)}"]
       for i, job in enumerate(jobs)], tmp_path, module="split_cifar")
  needles = ["--num_tasks=21 is invalid: expected an integer in 1..20.",
             "--classes_per_task=101 is invalid: expected an integer in 1..100.",
             "--num_tasks=6 is invalid: expected an integer in 1..5.",
             "--augment='rotate' is invalid: expected one of none, crop_flip."]
  for res, needle in zip(results, needles):
    assert res["code"] == 2 and needle in res["stderr"], res["stderr"][-2000:]
    assert "Traceback" not in res["stderr"]


@pytest.mark.extended
def test_any_image_dataset_in_split_and_permuted(tiny_cifar_dir, tmp_path):
  """Split MNIST's benchmark on CIFAR-10 (MLP over 32·32·3 inputs); Permuted on it too; and
  --classes_per_task is refused where every task has every class."""
  proc = run("experiments.split_mnist", "--dataset=cifar10", "--num_tasks=2", *QUICK,
             f"--data_dir={tiny_cifar_dir}", f"--workdir={tmp_path / 'split'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "split" / "results.json").read_text())
  assert res["benchmark"]["image_shape"] == [32, 32, 3] and res["benchmark"]["input_norm"] == "none"
  proc = run("experiments.permuted_mnist", "--dataset=cifar10", "--num_tasks=2", *QUICK,
             f"--data_dir={tiny_cifar_dir}", f"--workdir={tmp_path / 'perm'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for flag, needle in (("--classes_per_task=2", "--classes_per_task=2 is invalid: expected "
                        "unset for permuted_mnist"),
                       ("--augment=crop_flip", "--augment='crop_flip' is invalid: expected none "
                        "for permuted_mnist")):
    proc = run("experiments.permuted_mnist", flag, *QUICK, f"--data_dir={tiny_cifar_dir}",
               f"--workdir={tmp_path / 'bad'}")
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
