r"""One command for whatever accelerator JAX finds: the numbers of the performance section.

    python -m benchmarks.device                 # full: ≲ 5 minutes on a GPU
    python -m benchmarks.device --quick --data_dir=DIR   # reduced (the test suite, on CPU)

Parts, each timed on the default backend (``jax.default_backend()``):

* ``default_run``: the default command (``experiments.split_mnist --algo=ewc``, checkpoints and
  plots on) as a process, cold (empty compilation cache) then warm (the cache filled), with
  its phase timings (import, data, compile, train, Fisher, eval); the decoded data are cached
  by an untimed first run.
* ``train_step``: examples/s of the jitted EWC train chunk (MLP 784-400-400, one anchor) at
  batch 128 and 1024.
* ``fisher``: examples/s of the empirical and the true (exact expectation) Fisher over one task.
* ``sweep_k8`` / ``sweep_k64``: ``experiments.sweep`` over K configs (λ × 2 seeds) as one
  vmapped program, against K × the warm single run.

Writes ``benchmarks/results/<platform>/device.json`` (``--out`` to change the folder). The
quick mode shrinks every part (2 tasks, 300 examples, 1 epoch, MLP 784-64, fewer steps; K = 2
and 4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks import end_to_end

ROOT = Path(__file__).resolve().parents[1]
QUICK_FLAGS = ["--num_tasks=2", "--max_examples=300", "--epochs=1", "--hidden=64"]


def default_run(tmp: Path, extra: list[str]) -> dict:
  """Cold then warm default run (the decoded data cached first, untimed)."""
  end_to_end.one_run(tmp / "prime", tmp / "prime_cache", extra)
  cache = tmp / "xla"
  cold = end_to_end.one_run(tmp / "cold", cache, extra)
  warm = end_to_end.one_run(tmp / "warm", cache, extra)
  return {"command": "python -m experiments.split_mnist --algo=ewc " + " ".join(extra),
          "cold": cold, "warm": warm}


def train_step(quick: bool) -> list[dict]:
  from benchmarks import train_step as bench  # pylint: disable=import-outside-toplevel
  from ewc_jax import algorithms  # pylint: disable=import-outside-toplevel
  rows = []
  for batch_size in (128, 1024):
    steps = 2 if quick else max(8, 64 * 128 // batch_size)
    row = bench.bench(algorithms.ewc(p=2.0), 1, batch_size, steps)
    rows.append({"batch_size": batch_size, "steps": steps, **row})
  return rows


def fisher(quick: bool) -> list[dict]:
  """Empirical and true Fisher of the default MLP over one task of random MNIST-sized data."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from ewc_jax import fisher as fisher_lib  # pylint: disable=import-outside-toplevel
  from ewc_jax import heads  # pylint: disable=import-outside-toplevel
  n = 256 if quick else 12665  # Split MNIST task 1's size
  net = heads.task_incremental(num_tasks=1, classes_per_task=2)
  params = heads.init_params(net, jax.random.key(0), jnp.ones((1, 784)))
  logits_fn = heads.backbone_logits_fn(net, params["heads"], 0)
  x = jax.random.uniform(jax.random.key(1), (n, 784))
  y = jax.random.randint(jax.random.key(2), (n,), 0, 2)
  rows = []
  for kind in ("empirical", "true"):
    f = jax.jit(lambda p, xs, ys, key, kind=kind: fisher_lib.fisher_diagonal(
        logits_fn, p, xs, ys, kind=kind, batch_size=256, key=key))
    t = common.time_call(lambda f=f: jax.block_until_ready(
        f(params["backbone"], x, y, jax.random.key(3))), repeats=3)
    rows.append({"kind": kind, "examples": n, "seconds": t["median_s"],
                 "examples_per_s": n / t["median_s"]})
  return rows


def sweep(tmp: Path, k: int, extra: list[str], single_wall_s: float) -> dict:
  """``experiments.sweep`` over K = (K/2 λ values) × 2 seeds, one vmapped program."""
  lams = [f"{10.0 ** (i / 4):g}" for i in range(k // 2)]
  workdir = tmp / f"sweep_k{k}"
  cmd = [sys.executable, "-m", "experiments.sweep", "--algo=ewc", f"--lam={','.join(lams)}",
         "--seeds=0,1", "--validation_fraction=0", "--nocheckpoint", "--noplots", "--noprogress",
         f"--workdir={workdir}", *extra]
  env = {**os.environ, "EWC_JAX_CACHE_DIR": str(tmp / "prime_cache")}  # data cached, no xla
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise SystemExit(f"sweep K={k} failed:\n{proc.stderr[-3000:]}")
  timings = json.loads((workdir / "results.json").read_text())["timings"]
  return {"configs": k, "wall_s": wall, "timings": timings,
          "k_single_runs_s": k * single_wall_s, "ratio_to_k_single_runs": wall / (k * single_wall_s)}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="reduced sizes (a CPU check)")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir of MNIST")
  parser.add_argument("--out", default=None, help="output folder (default: "
                      "benchmarks/results/<platform>)")
  args = parser.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  platform = jax.default_backend()
  out = Path(args.out) if args.out else common.RESULTS / platform
  extra = ([f"--data_dir={args.data_dir}"] if args.data_dir else []) + (
      QUICK_FLAGS if args.quick else [])
  t0 = time.perf_counter()
  payload = {"platform": platform, "quick": args.quick, "load_before": os.getloadavg()}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    payload["default_run"] = default_run(tmp, extra)
    print(json.dumps(payload["default_run"]), flush=True)
    payload["train_step"] = train_step(args.quick)
    payload["fisher"] = fisher(args.quick)
    single = payload["default_run"]["warm"]["wall_s"]
    for k in ((2, 4) if args.quick else (8, 64)):
      payload[f"sweep_k{k}"] = sweep(tmp, k, extra, single)
      print(json.dumps(payload[f"sweep_k{k}"]), flush=True)
  payload["load_after"] = os.getloadavg()
  payload["total_s"] = time.perf_counter() - t0
  common.write("device", payload, folder=out)


if __name__ == "__main__":
  main()
