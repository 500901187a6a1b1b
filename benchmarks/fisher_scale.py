"""The streamed Fisher of an NNX language model over N examples: time linear in N, peak RSS flat,
and 8 forced host devices against 1 (issue 25).

    python -m benchmarks.fisher_scale [--quick] [--sizes=1000,10000,50000] [--device_examples=N]
                                      [--estimate] [--out=benchmarks/results]

Writes ``<out>/fisher_scale.json`` (the full configuration, the default: about 45 minutes on a
quiet 2-core CPU, written again after every child) or, with ``--quick``, ``<out>/fisher_scale_quick.json`` (the reduced
configuration, a few minutes on 2 CPU cores). The JSON names its configuration (``config``,
``configuration``). The committed ``benchmarks/results/fisher_scale_quick.json`` is a ``--quick``
run on a 2-core CPU shared with other work (its load averages are in it). ``--estimate`` times
one batch of the configuration in a child and writes ``<out>/fisher_scale_estimate.json``: the
predicted cost of the whole run (:func:`estimate`), for a machine where the run is too long.

Model (``LM``): an NNX causal language model ``[B, T] -> [B, T, V]``: token ``nnx.Embed`` +
learned position ``nnx.Embed``, pre-LayerNorm blocks (``nnx.LayerNorm``,
``nnx.MultiHeadAttention(decode=False)`` with a causal mask, an MLP with GELU), a final
LayerNorm and a per-token ``nnx.Linear`` head; ``model.eval()``.

* full (default): d_model 256, 4 layers, 4 heads, MLP 1024, sequence 128, vocabulary 1000;
  N = 1000, 10000, 50000; devices compared at N = 1000.
* ``--quick``: d_model 64, 2 layers, 4 heads, MLP 256, sequence 32, vocabulary 256;
  N = 1000, 4000, 16000; devices compared at N = 1000.

Both stream batches of 128 rows (a smaller last batch, which the library pads into the same
compiled program). Data: random tokens ``[b, T + 1]`` drawn batch by batch from
``fold_in(key, batch index)`` (a generator: the N examples never exist together); inputs are
the first T tokens, labels the next tokens ``[b, T]``.

Measured, each N in its own fresh subprocess on JAX's default backend (so that the peak RSS,
``ru_maxrss``, is that N's alone):
``ewc_jax.fisher_from_batches(logits_fn, params, generator, kind="empirical")`` with
``logits_fn = lambda p, x: nnx.merge(graphdef, p, rest)(x)``.

* ``warmup_s``: a first call over two batches, a full one and one of the size of N's last batch
  (padded when smaller), timed alone: tracing, compilation (the second update takes the
  first's output state) and those batches.
* ``fisher_s``: the call over the N examples, after the warm-up (so without the compilation),
  blocked until the result is ready; it includes generating the data. ``examples_per_s``,
  ``s_per_example`` follow.
* ``compiles_in_timed_call``: XLA compilations during the timed call (0 expected) and their
  seconds (``compile_s_in_timed_call``).
* ``leaves_by_method``: ``fisher_plan``'s per-example path for each parameter leaf (no
  ``"vmap"``: every leaf on an exact fast path).
* ``stream_peak_rss_mb``: the peak RSS (``ru_maxrss``) during the timed call alone: before it
  the peak is reset to the current RSS (``rss_stream_start_mb``; Linux ``/proc/self/clear_refs``,
  ``null`` elsewhere); ``stream_growth_mb`` is what streaming the N examples added to it.
  ``peak_rss_warmup_mb``: the peak through the warm-up (imports, model, compilation);
  ``peak_rss_mb``: the whole process's peak, the larger of the two.
  Host memory; on an accelerator ``device_peak_mb`` is its ``peak_bytes_in_use`` (``null`` where
  the backend does not report it, as on the CPU).
* ``loadavg_before``/``loadavg_after``: ``os.getloadavg()`` around the child (the machine may be
  shared: read the timings with it).

Summary (``scaling``): seconds per example for each N and max/min over N (1.0 = exactly linear,
a fixed cost per call would make small N dearer), a least-squares line ``fisher_s = a + b N``,
and the peak RSS max/min over N (goal: within 10 %, ``rss_flat_within_10pct``) of the timed
call's peak (``stream_peak_rss_mb``; where it cannot be reset, the whole process's) and, beside
it, of the whole process's (``peak_rss_mb``: dominated by compilation, whose peak varies from run
to run with the load, by up to ~10 % here, whatever N).

Devices (``devices``): the same Fisher at ``device_examples`` in two more subprocesses, one with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and one without: the parameters
replicated over a mesh ``(devices,)`` named ``data`` and each batch ``jax.device_put`` with
``NamedSharding(mesh, P("data"))`` (split over the devices); both on the CPU
(``JAX_PLATFORMS=cpu``, also on a machine with an accelerator). The time ratio 8 vs 1 is
reported, not asserted (forced host devices share the same CPU cores), as is the relative
difference of the two Fishers (their sums over all leaves).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import subprocess
import sys
import time
from typing import Iterator, Sequence

from benchmarks import common

FORCE_DEVICES = "--xla_force_host_platform_device_count"


@dataclasses.dataclass(frozen=True)
class Config:
  """A benchmark configuration: the model, the batch, the N measured and the device run."""
  name: str
  d_model: int
  layers: int
  heads: int
  mlp: int
  seq: int
  vocab: int
  batch: int
  sizes: tuple[int, ...]
  device_examples: int
  devices: int = 8


FULL = Config("full", d_model=256, layers=4, heads=4, mlp=1024, seq=128, vocab=1000, batch=128,
              sizes=(1000, 10000, 50000), device_examples=1000)
QUICK = Config("quick", d_model=64, layers=2, heads=4, mlp=256, seq=32, vocab=256, batch=128,
               sizes=(1000, 4000, 16000), device_examples=1000)


# --- model and data ----------------------------------------------------------------------------

def _model_classes():
  """``(Block, LM)``, defined on first use (flax is imported only where it runs)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Block(nnx.Module):
    """x + attn(ln(x), causal), then x + mlp(ln(x))."""

    def __init__(self, d: int, heads: int, mlp: int, rngs: nnx.Rngs):
      self.ln1 = nnx.LayerNorm(d, rngs=rngs)
      self.attn = nnx.MultiHeadAttention(heads, d, d, decode=False, rngs=rngs)
      self.ln2 = nnx.LayerNorm(d, rngs=rngs)
      self.fc1 = nnx.Linear(d, mlp, rngs=rngs)
      self.fc2 = nnx.Linear(mlp, d, rngs=rngs)

    def __call__(self, x, mask):
      x = x + self.attn(self.ln1(x), mask=mask)
      return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))

  class LM(nnx.Module):
    """tokens ``[B, T]`` -> next-token logits ``[B, T, V]``."""

    def __init__(self, config: Config, rngs: nnx.Rngs):
      d = config.d_model
      self.tokens = nnx.Embed(config.vocab, d, rngs=rngs)
      self.positions = nnx.Embed(config.seq, d, rngs=rngs)
      self.blocks = nnx.List([Block(d, config.heads, config.mlp, rngs)
                              for _ in range(config.layers)])
      self.ln = nnx.LayerNorm(d, rngs=rngs)
      self.head = nnx.Linear(d, config.vocab, rngs=rngs)

    def __call__(self, tokens):
      x = self.tokens(tokens) + self.positions(jnp.arange(tokens.shape[1]))[None]
      mask = nnx.make_causal_mask(tokens)
      for block in self.blocks:
        x = block(x, mask)
      return self.head(self.ln(x))

  return Block, LM


def build(config: Config, seed: int = 0):
  """``(logits_fn, params)`` of the config's ``LM`` in evaluation mode; ``params`` is the
  ``nnx.State`` of its ``nnx.Param``s, ``logits_fn(p, x) = nnx.merge(graphdef, p, rest)(x)``."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  _, lm = _model_classes()
  model = lm(config, nnx.Rngs(seed))
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  logits_fn = lambda p, x: nnx.merge(graphdef, p, rest)(x)  # noqa: E731
  return logits_fn, params


@functools.cache
def _draw():
  """The jitted ``(key, rows, T, V) -> (tokens[:, :-1], tokens[:, 1:])`` (one per process)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def draw(key, rows, seq, vocab):
    tokens = jax.random.randint(key, (rows, seq + 1), 0, vocab, jnp.int32)
    return tokens[:, :-1], tokens[:, 1:]
  return jax.jit(draw, static_argnums=(1, 2, 3))


def batches(key, n: int, config: Config, sharding=None) -> Iterator[tuple]:
  """``(inputs [b, T], labels [b, T])`` int32 batches of ``config.batch`` rows (the last one
  smaller) covering ``n`` rows; batch i is drawn from ``fold_in(key, i)`` when it is asked for.
  With ``sharding`` each array is ``jax.device_put`` with it."""
  import jax  # pylint: disable=import-outside-toplevel
  draw = _draw()
  for i, start in enumerate(range(0, n, config.batch)):
    x, y = draw(jax.random.fold_in(key, i), min(config.batch, n - start), config.seq,
                config.vocab)
    if sharding is not None:
      x, y = jax.device_put(x, sharding), jax.device_put(y, sharding)
    yield x, y


# --- one measurement -----------------------------------------------------------------------------

def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _reset_peak_rss() -> float | None:
  """Resets the process's peak RSS to its current RSS (Linux: ``/proc/self/clear_refs`` 5, which
  ``ru_maxrss`` follows) and returns that RSS in MiB; ``None`` where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    with open("/proc/self/status") as f:
      rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
  except (OSError, StopIteration, ValueError):
    return None
  return rss / 1024


def warmup_examples(config: Config, n: int) -> int:
  """Rows of the warm-up stream: a full batch, then one of the size of N's last batch (the second
  update takes the first one's output state; a smaller last batch is padded), so that the timed
  call over N rows compiles nothing."""
  return config.batch + (n % config.batch or config.batch)


def measure(config: Config, n: int, devices: int = 1, seed: int = 0) -> dict:
  """The Fisher of ``config``'s model over ``n`` streamed examples on the first ``devices``
  devices (parameters replicated over a mesh ``(devices,)``, batches split over it): the
  warm-up and timed seconds, the throughput, the peak RSS and a checksum of the result."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import (Mesh, NamedSharding,  # pylint: disable=import-outside-toplevel
                            PartitionSpec as P)

  from ewc_jax import (fisher_from_batches, fisher_plan,  # pylint: disable=import-outside-toplevel
                       num_parameters)
  if len(jax.devices()) < devices:
    raise ValueError(f"{devices} devices asked for, {len(jax.devices())} present (set XLA_FLAGS="
                     f"{FORCE_DEVICES}={devices} before jax starts).")
  last = n % config.batch or config.batch
  if config.batch % devices or last % devices:
    raise ValueError(f"the batch ({config.batch}) and the last batch ({last}) must split evenly "
                     f"over {devices} devices.")
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
  logits_fn, params = build(config, seed)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  split = NamedSharding(mesh, P("data"))
  key = jax.random.key(seed + 1)
  methods = {}
  for leaf in fisher_plan(logits_fn, params, next(batches(key, 1, config))[0]):
    methods[leaf.method] = methods.get(leaf.method, 0) + 1

  warm_n = warmup_examples(config, n)
  t0, c0 = time.perf_counter(), time.process_time()
  warm = fisher_from_batches(logits_fn, params,
                             batches(jax.random.fold_in(key, 10**6), warm_n, config, split))
  jax.block_until_ready(warm)
  warmup_s, warmup_cpu_s = time.perf_counter() - t0, time.process_time() - c0
  rss_warm = _peak_rss_mb()
  rss_start = _reset_peak_rss()

  compiles = []

  def listener(name, secs, **_):
    if "backend_compile" in name:
      compiles.append(secs)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    t0, c0 = time.perf_counter(), time.process_time()
    fisher = fisher_from_batches(logits_fn, params, batches(key, n, config, split))
    jax.block_until_ready(fisher)
    fisher_s, fisher_cpu_s = time.perf_counter() - t0, time.process_time() - c0
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  rss_stream = _peak_rss_mb()
  stats = jax.devices()[0].memory_stats() or {}
  device_peak = stats.get("peak_bytes_in_use")
  leaves = [np.asarray(v, np.float64) for v in jax.tree.leaves(fisher)]
  return {"examples": n, "devices": devices, "backend": jax.default_backend(),
          "batch": config.batch, "batches": -(-n // config.batch), "warmup_examples": warm_n,
          "parameters": num_parameters(params),
          "warmup_s": warmup_s, "fisher_s": fisher_s, "examples_per_s": n / fisher_s,
          "warmup_cpu_s": warmup_cpu_s, "fisher_cpu_s": fisher_cpu_s,
          "s_per_example": fisher_s / n,
          "compiles_in_timed_call": len(compiles),
          "compile_s_in_timed_call": sum(compiles), "peak_rss_warmup_mb": rss_warm,
          "rss_stream_start_mb": rss_start,
          "stream_peak_rss_mb": None if rss_start is None else rss_stream,
          "stream_growth_mb": None if rss_start is None else rss_stream - rss_start,
          "peak_rss_mb": rss_stream if rss_start is None else max(rss_warm, rss_stream),
          "device_peak_mb": None if device_peak is None else device_peak / 2**20,
          "leaves_by_method": methods, "fisher_sum": float(sum(v.sum() for v in leaves)),
          "fisher_finite": bool(all(np.isfinite(v).all() for v in leaves))}


# --- summaries ---------------------------------------------------------------------------------

def scaling(rows: Sequence[dict]) -> dict:
  """Linearity of time and flatness of peak RSS over the rows' N (one row per N)."""
  rows = sorted(rows, key=lambda r: r["examples"])
  ns = [r["examples"] for r in rows]
  per = [r["fisher_s"] / r["examples"] for r in rows]
  stream = all(r.get("stream_peak_rss_mb") is not None for r in rows)
  rss = [r["stream_peak_rss_mb" if stream else "peak_rss_mb"] for r in rows]
  whole = [r["peak_rss_mb"] for r in rows]
  mean_n = sum(ns) / len(ns)
  mean_t = sum(r["fisher_s"] for r in rows) / len(rows)
  var = sum((x - mean_n) ** 2 for x in ns)
  slope = (sum((x - mean_n) * (r["fisher_s"] - mean_t) for x, r in zip(ns, rows)) / var
           if var else None)
  rss_ratio = max(rss) / min(rss)
  cpu = [r["fisher_cpu_s"] / r["examples"] for r in rows]
  return {"examples": ns, "s_per_example": per,
          "s_per_example_vs_smallest": [p / per[0] for p in per],
          "s_per_example_max_over_min": max(per) / min(per),
          "cpu_s_per_example": cpu, "cpu_s_per_example_max_over_min": max(cpu) / min(cpu),
          "fit_fisher_s": None if slope is None else {
              "intercept_s": mean_t - slope * mean_n, "s_per_example": slope},
          "rss_measured": "stream_peak_rss_mb" if stream else "peak_rss_mb",
          "rss_mb": rss, "rss_max_over_min": rss_ratio, "rss_flat_within_10pct": rss_ratio <= 1.10,
          "whole_process_peak_rss_mb": whole,
          "whole_process_peak_rss_max_over_min": max(whole) / min(whole)}


def device_ratio(one: dict, many: dict) -> dict:
  """``many`` devices against ``one``: time ratio, speed-up and how far the Fishers differ."""
  return {"devices": [one["devices"], many["devices"]], "examples": one["examples"],
          "fisher_s": [one["fisher_s"], many["fisher_s"]],
          "time_ratio_many_over_one": many["fisher_s"] / one["fisher_s"],
          "speedup": one["fisher_s"] / many["fisher_s"],
          "fisher_sum_rel_diff": abs(many["fisher_sum"] - one["fisher_sum"]) / max(
              abs(one["fisher_sum"]), 1e-30)}


def estimate(config: Config, row: dict, device_time_ratio: float = 1.0) -> dict:
  """The cost of ``config``'s whole run predicted from one measured child ``row`` of that
  config (e.g. one timed batch): every child compiles again (its ``warmup_s``), and the timed
  calls cost ``s_per_example`` per example (the 8-device run ``device_time_ratio`` times the
  1-device one). Wall seconds at the load measured, and process CPU seconds (all threads)."""
  children = len(config.sizes) + (2 if config.device_examples else 0)
  examples = sum(config.sizes) + config.device_examples * (1 + device_time_ratio)

  def total(warm: float, timed: float) -> dict:
    per = timed / row["examples"]
    return {"warmup_s": warm * children, "fisher_s": per * examples,
            "total_s": warm * children + per * examples,
            "fisher_s_by_size": {str(n): per * n for n in config.sizes}}
  return {"children": children, "timed_examples": examples,
          "device_time_ratio_assumed": device_time_ratio,
          "from_examples": row["examples"],
          "wall": total(row["warmup_s"], row["fisher_s"]),
          "cpu": total(row["warmup_cpu_s"], row["fisher_cpu_s"])}


# --- processes ---------------------------------------------------------------------------------

def run_child(config: Config, n: int, devices: int = 1, platform: str | None = None) -> dict:
  """``measure`` in a fresh interpreter (``devices`` forced host devices when > 1; the parent's
  environment otherwise, less any forced device count; ``platform``: ``JAX_PLATFORMS``), with
  the load average around it."""
  env = dict(os.environ)
  if platform:
    env["JAX_PLATFORMS"] = platform
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(FORCE_DEVICES)]
  if devices > 1:
    flags.append(f"{FORCE_DEVICES}={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  spec = json.dumps({"config": dataclasses.asdict(config), "n": n, "devices": devices})
  before = list(os.getloadavg())
  proc = subprocess.run([sys.executable, "-m", "benchmarks.fisher_scale", f"--child={spec}"],
                        capture_output=True, text=True, env=env, cwd=root)
  if proc.returncode:
    raise RuntimeError(f"child N={n} devices={devices} failed:\n{proc.stderr[-3000:]}")
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  return {**row, "loadavg_before": before, "loadavg_after": list(os.getloadavg())}


def _config_from(spec: dict) -> Config:
  return Config(**{**spec, "sizes": tuple(spec["sizes"])})


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the reduced configuration")
  parser.add_argument("--sizes", default=None, help="comma-separated N (default: the config's)")
  parser.add_argument("--device_examples", type=int, default=None,
                      help="N of the 8 vs 1 device run (0: skip it)")
  parser.add_argument("--estimate", action="store_true",
                      help="time one batch of the configuration (after its warm-up) and write "
                           "the predicted cost of the whole run, <out>/fisher_scale_estimate.json")
  parser.add_argument("--out", default=str(common.RESULTS))
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    spec = json.loads(args.child)
    print(json.dumps(measure(_config_from(spec["config"]), spec["n"], spec["devices"])))
    return 0

  config = QUICK if args.quick else FULL
  if args.sizes:
    config = dataclasses.replace(config, sizes=tuple(int(s) for s in args.sizes.split(",")))
  if args.device_examples is not None:
    config = dataclasses.replace(config, device_examples=args.device_examples)
  if args.estimate:
    row = run_child(config, config.batch)
    common.write(f"{'fisher_scale_quick' if args.quick else 'fisher_scale'}_estimate", {
        "config": dataclasses.asdict(config), "kind": "empirical", "measured": row,
        "estimate": estimate(config, row),
        "note": ("predicted, not measured: one batch of the configuration timed after its "
                 "warm-up, on this machine at the load in `measured`, extrapolated linearly in "
                 "N (as the --quick run found it: s_per_example_max_over_min 1.09), each child "
                 "compiling once (its warm-up); the 8-device CPU run taken as long as the "
                 "1-device one (the --quick run measured 0.91x). `cpu` is process CPU time over "
                 "all threads, less sensitive to the load than `wall`.")}, folder=args.out)
    return 0
  name = "fisher_scale_quick" if args.quick else "fisher_scale"
  note = ("quick configuration (reduced model and N, for a CPU); the issue's full configuration "
          "is the default run" if args.quick else "full configuration (issue 25)")

  def write(rows: list[dict], devices: dict | None, complete: bool) -> None:
    # Written after every child, so that a run cut short keeps what it measured.
    common.write(name, {"config": dataclasses.asdict(config), "configuration": note,
                        "kind": "empirical", "complete": complete, "rows": rows,
                        "scaling": scaling(rows) if rows else None,
                        "devices": devices}, folder=args.out)

  rows: list[dict] = []
  for n in config.sizes:
    rows.append(run_child(config, n))
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    write(rows, None, complete=False)
  devices = None
  if config.device_examples:
    pair = []
    for d in (1, config.devices):
      pair.append(run_child(config, config.device_examples, d, platform="cpu"))
      print(json.dumps(pair[-1]), file=sys.stderr, flush=True)
    devices = {"rows": pair, **device_ratio(*pair)}
  write(rows, devices, complete=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
