r"""A sweep of K configs trained at once (vmapped) vs the same K single runs one after another,
on the default Split MNIST protocol (real MNIST, 5 tasks, 2 epochs, batch 128, MLP 784-400-400),
and the vmapped sweep on 1 vs N forced host devices (config axis sharded over a mesh).

    python -m benchmarks.sweep [--repeats=2] [--devices=4] [--no_devices]

The K configs: λ ∈ {1, 10, 100, 1000} × seeds {0, 1}. Sequential and vmapped are measured in the
same process, interleaved (seq, vmap, seq, vmap, ...), after one untimed warm-up of each that
fills a fresh persistent compilation cache (so every timed run reads its programs from the
cache, as a second CLI run does; the compile seconds are reported apart). The machine may be
shared: the load average before and after is recorded. Also compared: K x the fastest PyTorch
peer's single run on this machine (benchmarks/results/peers.json; 17.3 s when absent).

--max_parallel=N: the sweep in chunks of N configs. Its first task is trained once per seed (the
configs differing only in λ share it; ewc_jax.continual.sweep) unless --no_share_first_task (the
same bits: a before/after comparison); vmapped, only when there are several chunks.
--vectorize=auto|true|false: the sweep's ``vectorize`` (auto: mapped on one CPU device, each
config bit-identical to its single run; true: vmapped). --out: the JSON's name (default sweep).

Two diagnostics: (1) a control run, config 0 with its learning rate moved by one float32 ulp, to
show how far float-level differences carry on this protocol (vmapped and sequential runs differ
only in the float rounding of batched vs unbatched matmuls); (2) the first layer's forward and
weight-gradient matmuls, K-batched (what vmap makes of them) vs K unbatched calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
PEER_SECONDS = 17.3  # fastest PyTorch peer's single run as the issue measured it on this machine


def peer_seconds() -> tuple[float, str]:
  """The fastest peer's median single-run wall time from benchmarks/results/peers.json (same
  machine, `make bench-peers`), else the issue's 17.3 s."""
  path = common.RESULTS / "peers.json"
  try:
    doc = json.loads(path.read_text())
    best = min((r["median_wall_s"], name) for name, r in doc["results"].items()
               if not name.startswith("ours") and r.get("median_wall_s"))
    return best[0], f"{best[1]} median in {path.name} ({doc.get('started_utc', '')})"
  except (OSError, ValueError, KeyError):
    return PEER_SECONDS, "issue's measurement of plain PyTorch"


LAMS, SEEDS = (1.0, 10.0, 100.0, 1000.0), (0, 1)


def setup():
  import jax  # pylint: disable=import-outside-toplevel
  from ewc_jax import continual, heads  # pylint: disable=import-outside-toplevel
  from ewc_jax.continual import sweep  # pylint: disable=import-outside-toplevel
  from experiments import data, protocols, tasks  # pylint: disable=import-outside-toplevel
  cache = Path(tempfile.mkdtemp(prefix="sweep_bench_xla_"))
  jax.config.update("jax_compilation_cache_dir", str(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  ds = data.load_dataset("mnist")
  built = protocols.split(ds, "task", 5, None)
  train, test = tasks.to_device(built.train), tasks.to_device(built.test)
  base = continual.Config()  # the default protocol: ewc, lam 1000, 2 epochs, batch 128
  net = heads.make_network(base.scenario, built.class_groups, base.hidden)
  configs = sweep.grid(base, lam=list(LAMS), seed=list(SEEDS))
  return net, train, test, configs


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def sequential(net, train, test, configs):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ewc_jax import continual  # pylint: disable=import-outside-toplevel
  results = [continual.run(c, net, train, test) for c in configs]
  phases = {k: sum(r.timings[k] for r in results) for k in results[0].timings}
  return np.stack([r.acc_matrix for r in results]), phases


SWEEP_OPTIONS: dict = {}  # sweep.run's max_parallel and share_first_task (from the flags)


def swept(net, train, test, configs, devices=None, **options):
  """The sweep (vmapped or mapped: SWEEP_OPTIONS, then ``options``); the JSON keeps its
  ``vmapped_*`` keys for either."""
  from ewc_jax.continual import sweep  # pylint: disable=import-outside-toplevel
  r = sweep.run(configs, net, train, test, devices=devices, **{**SWEEP_OPTIONS, **options})
  return r.acc_matrix, {**{k: v for k, v in r.timings.items() if k != "total"},
                        "vectorized": r.layout.vectorized}


def loadavg() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def uptime() -> str:
  try:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
  except OSError:
    return f"loadavg {loadavg()}"


def same_process(repeats: int) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  net, train, test, configs = setup()
  k = len(configs)
  warm_seq_s, _ = timed(lambda: sequential(net, train, test, configs[:1]))
  warm_vmap_s, _ = timed(lambda: swept(net, train, test, configs))
  seq, vm, diffs, identical = [], [], [], []
  for _ in range(repeats):
    s, (acc_s, ph_s) = timed(lambda: sequential(net, train, test, configs))
    seq.append({"wall_s": s, **ph_s, "loadavg": loadavg()})
    v, (acc_v, ph_v) = timed(lambda: swept(net, train, test, configs))
    vm.append({"wall_s": v, **ph_v, "loadavg": loadavg()})
    diffs.append(float(np.abs(acc_s - acc_v).max()))
    identical.append(bool(np.array_equal(acc_s, acc_v)))
    print(json.dumps({"sequential": seq[-1], "vmapped": vm[-1]}), file=sys.stderr, flush=True)
  from ewc_jax import continual  # pylint: disable=import-outside-toplevel
  lr_ulp = float(np.nextafter(np.float32(configs[0].lr), np.float32(1.0)))
  control = continual.run(dataclasses.replace(configs[0], lr=lr_ulp), net, train, test)
  peer_s, peer_src = peer_seconds()
  seq_med = statistics.median(r["wall_s"] for r in seq)
  vm_med = statistics.median(r["wall_s"] for r in vm)
  aa = acc_v[:, -1].mean(-1)
  return {
      "k": k, "configs": [{"lam": c.lam, "seed": c.seed} for c in configs],
      "warmup_s": {"one_single_run_cold": warm_seq_s, "vmapped_cold": warm_vmap_s},
      "sequential_runs": seq, "vmapped_runs": vm,
      "sequential_median_s": seq_med, "vmapped_median_s": vm_med,
      "vmapped_over_sequential": vm_med / seq_med,
      "goal_vmapped_over_sequential": 0.5,
      "peer_single_run_s": peer_s, "peer_source": peer_src,
      "peer_sequential_s": k * peer_s,
      "speedup_vs_peer": k * peer_s / vm_med,
      "goal_speedup_vs_peer": 10.0,
      "max_abs_diff_acc_vmapped_vs_sequential": max(diffs),
      "bit_identical_per_config": all(identical),
      "max_abs_diff_acc_per_config": np.abs(acc_s - acc_v).max(axis=(1, 2)).tolist(),
      "control_max_abs_diff_acc_config0_lr_plus_1ulp": float(
          np.abs(control.acc_matrix - acc_s[0]).max()),
      "matmul_check": matmul_check(k),
      "average_accuracy_per_config": [float(a) for a in aa],
  }


def matmul_check(k: int, reps: int = 30) -> dict:
  """Seconds of the first layer's matmuls: one K-batched einsum vs K unbatched calls."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  key = jax.random.key(0)
  x = jax.random.normal(key, (k, 128, 784))
  w = jax.random.normal(key, (k, 784, 400))
  d = jax.random.normal(key, (k, 128, 400))
  pairs = {"forward": (jax.jit(lambda x, w: jnp.einsum("kbi,kio->kbo", x, w)),
                       jax.jit(lambda x, w: x @ w), (x, w)),
           "weight_gradient": (jax.jit(lambda x, d: jnp.einsum("kbi,kbo->kio", x, d)),
                               jax.jit(lambda x, d: x.T @ d), (x, d))}
  out = {}
  for name, (batched, single, (a, b)) in pairs.items():
    tb = common.time_call(lambda: batched(a, b).block_until_ready(), repeats=reps)["min_s"]
    parts = [(a[i], b[i]) for i in range(k)]
    ts = common.time_call(lambda: jax.block_until_ready([single(*ab) for ab in parts]),
                          repeats=reps)["min_s"]
    out[name] = {"batched_s": tb, "k_unbatched_s": ts, "ratio": tb / ts}
  return out


def devices_child(repeats: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  net, train, test, configs = setup()
  devs = jax.devices()
  swept(net, train, test, configs, devs[:1], vectorize=True)  # warm-ups (compile cache)
  swept(net, train, test, configs, devs, vectorize=True)
  one, many, diffs = [], [], []
  for _ in range(repeats):
    s, (acc1, ph1) = timed(lambda: swept(net, train, test, configs, devs[:1], vectorize=True))
    one.append({"wall_s": s, **ph1, "loadavg": loadavg()})
    s, (accn, phn) = timed(lambda: swept(net, train, test, configs, devs, vectorize=True))
    many.append({"wall_s": s, **phn, "loadavg": loadavg()})
    diffs.append(float(np.abs(acc1 - accn).max()))
  m1 = statistics.median(r["wall_s"] for r in one)
  mn = statistics.median(r["wall_s"] for r in many)
  return {"num_devices": len(devs), "one_device_runs": one, "all_devices_runs": many,
          "one_device_median_s": m1, "all_devices_median_s": mn, "speedup": m1 / mn,
          "max_abs_diff_acc": max(diffs)}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--devices", type=int, default=4)
  parser.add_argument("--no_devices", action="store_true")
  parser.add_argument("--max_parallel", type=int, default=None)
  parser.add_argument("--no_share_first_task", action="store_true")
  parser.add_argument("--vectorize", choices=("auto", "true", "false"), default="auto")
  parser.add_argument("--out", default="sweep")
  parser.add_argument("--devices_child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  SWEEP_OPTIONS.update(max_parallel=args.max_parallel,
                       share_first_task=not args.no_share_first_task,
                       vectorize={"auto": None, "true": True, "false": False}[args.vectorize])
  if args.devices_child:
    print(json.dumps(devices_child(args.repeats)))
    return
  before = uptime()
  payload = {"protocol": "Split MNIST task-incremental, default Config (ewc, empirical Fisher, "
                         "5 tasks, 2 epochs, batch 128, MLP 784-400-400), real MNIST",
             "uptime_before": before, "sweep_options": dict(SWEEP_OPTIONS)}
  payload["same_process"] = same_process(args.repeats)
  if not args.no_devices:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sweep", "--devices_child",
                           f"--repeats={args.repeats}", *sys.argv[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
      raise SystemExit(f"devices child failed:\n{proc.stderr[-3000:]}")
    payload["forced_host_devices"] = json.loads(proc.stdout.strip().splitlines()[-1])
    payload["forced_host_devices"]["note"] = (
        f"{args.devices} XLA host devices forced on a {os.cpu_count()}-core CPU: they share the "
        "same cores, so this checks the sharded path's overhead, not a real multi-device speedup")
  payload["uptime_after"] = uptime()
  common.write(args.out, payload)


if __name__ == "__main__":
  main()
