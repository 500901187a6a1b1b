"""benchmarks/device.py (the one-command accelerator run) in its reduced mode, on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.extended
def test_quick_mode_writes_every_part(tiny_mnist_dir, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "benchmarks.device", "--quick",
                         f"--data_dir={tiny_mnist_dir}", f"--out={tmp_path}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads((tmp_path / "device.json").read_text())
  assert doc["platform"] == "cpu" and doc["quick"] is True
  cold, warm = doc["default_run"]["cold"], doc["default_run"]["warm"]
  for run in (cold, warm):
    assert run["wall_s"] > 0 and 0 <= run["average_accuracy"] <= 1
    assert all(run[k] >= 0 for k in ("import", "compile", "train", "fisher", "eval"))
  assert warm["compile"] < cold["compile"]  # the persistent cache serves the warm run
  assert [r["batch_size"] for r in doc["train_step"]] == [128, 1024]
  assert all(r["examples_per_s"] > 0 for r in doc["train_step"] + doc["fisher"])
  assert {r["kind"] for r in doc["fisher"]} == {"empirical", "true"}
  for k in (2, 4):
    part = doc[f"sweep_k{k}"]
    assert part["configs"] == k and part["wall_s"] > 0 and part["ratio_to_k_single_runs"] > 0
