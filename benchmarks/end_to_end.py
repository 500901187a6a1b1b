"""Default Split MNIST EWC, whole process: wall time split into import, data, compile, train,
Fisher and eval, for a cold run (empty compilation cache) and a warm one (cache filled).

    python -m benchmarks.end_to_end [--repeats=3] [-- extra flags for experiments.split_mnist]

Each repeat: a cold run with a fresh JAX compilation-cache folder, then a warm run reusing it.
The decoded-data cache is shared (decoding MNIST's PNGs once is not what this measures).
Reported: medians over repeats of the process wall time and of each phase, and the accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]


def one_run(workdir: Path, xla_cache: Path, extra: list[str]) -> dict:
  env = dict(os.environ)
  cmd = [sys.executable, "-m", "experiments.split_mnist", "--algo=ewc", f"--workdir={workdir}",
         "--noprogress", *extra]
  # <EWC_JAX_CACHE_DIR>/xla holds the compilation cache (per cold/warm pair) and
  # <EWC_JAX_CACHE_DIR>/datasets the decoded data (one shared folder, linked in).
  env["EWC_JAX_CACHE_DIR"] = str(xla_cache)
  xla_cache.mkdir(parents=True, exist_ok=True)
  shared = xla_cache.parent / "datasets"
  shared.mkdir(exist_ok=True)
  if not (xla_cache / "datasets").exists():
    os.symlink(shared, xla_cache / "datasets")
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise SystemExit(f"run failed:\n{proc.stderr[-3000:]}")
  res = json.loads((workdir / "results.json").read_text())
  return {"wall_s": wall, "average_accuracy": res["average_accuracy"],
          **{k: v for k, v in res["timings"].items() if isinstance(v, float)}}


def median_of(runs: list[dict]) -> dict:
  return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=3)
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != "--"]
  cold, warm = [], []
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    one_run(tmp / "prime", tmp / "prime_cache", extra)  # fills the decoded-data cache
    for i in range(args.repeats):
      cache = tmp / f"xla_{i}"
      cold.append(one_run(tmp / f"cold_{i}", cache, extra))
      warm.append(one_run(tmp / f"warm_{i}", cache, extra))
      shutil.rmtree(cache, ignore_errors=True)
      print({"cold": cold[-1], "warm": warm[-1]}, flush=True)
  common.write("end_to_end", {
      "command": "python -m experiments.split_mnist --algo=ewc " + " ".join(extra),
      "repeats": args.repeats, "cold_median": median_of(cold), "warm_median": median_of(warm),
      "cold_runs": cold, "warm_runs": warm})


if __name__ == "__main__":
  main()
