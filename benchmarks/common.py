"""Shared helpers of the benchmarks: timing, the machine's matmul peak, JSON output (with the
machine and every dependency's version, ``benchmarks.versions``)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks import versions

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
  """The device, the platform, the load average and the versions of Python and of every
  dependency (``versions``: ``benchmarks.versions.DISTRIBUTIONS``)."""
  import jax  # pylint: disable=import-outside-toplevel
  return {"python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(), "device": str(jax.devices()[0]),
          "cpu_count": os.cpu_count(), "platform": platform.platform(),
          "loadavg_at_write": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
          "versions": versions.versions()}


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict:
  """Median/min seconds of ``fn()`` (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  """Measured float32 matmul FLOP/s of this device (a large ``jnp.dot``)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  t = time_call(lambda: dot(a, b).block_until_ready(), repeats=repeats)
  return 2.0 * n ** 3 / t["min_s"]


def write(name: str, payload: dict, folder: Path = RESULTS) -> Path:
  """Prints ``payload`` as JSON and writes it to ``<folder>/<name>.json`` (default
  ``benchmarks/results``)."""
  payload = {"benchmark": name, "machine": machine(),
             "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **payload}
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"{name}.json"
  text = json.dumps(payload, indent=2)
  path.write_text(text + "\n")
  print(text)
  print(f"wrote {path}", file=sys.stderr)
  return path
