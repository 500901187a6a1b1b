"""Import time of the library and of the CLI, each in fresh processes, against a budget.

    python -m benchmarks.import_time [--repeats=7]

Each sample is a fresh ``python -c`` child (cwd: this checkout) that times one ``import`` with
``time.process_time`` (CPU) and ``time.perf_counter`` (wall), so interpreter start-up and
teardown are left out; the modules are interleaved round robin after one untimed warm-up each
(byte-code and page cache). Timed: ``import ewc_jax`` (the library), ``import
experiments.split_mnist`` (what ``python -m experiments.split_mnist`` imports before it runs)
and, to say where the time goes, ``import jax`` and ``import ml_dtypes``.

Writes ``benchmarks/results/import_time.json`` (every sample, medians, the load average before
and after, every dependency's version) and exits 1 with one line naming what went over when the
median CPU seconds of a budgeted import exceed its budget (``BUDGETS_S``).

Why CPU seconds: an import is one thread's work, so its CPU time is what it costs on an idle
machine, while its wall time on this shared 2-core CPU grows with other jobs' load. Measured in
issue 27 (medians of 5, two interleaved rounds per version, load 9-12 from other jobs), ml_dtypes
0.6.0 vs 0.7.0: ``import ewc_jax`` CPU 0.63 / 0.64 vs 1.13 / 1.12 s (wall 1.53 / 1.98 vs 2.29 /
3.02 s), the CLI's import CPU 0.73 / 0.76 vs 1.31 / 1.32 s (wall 1.51 / 1.96 vs 2.81 / 4.45 s),
``import ml_dtypes`` alone CPU 0.09 vs 0.61-0.63 s. The budgets (ewc_jax 0.85 s, CLI 0.95 s) sit
~0.2 s (~30%) above 0.6.0 and ~0.3 s below 0.7.0: a regression of that size fails here, noise
does not. The wall times are recorded beside them. This is a benchmark, not a test: the suite
has no timing asserts (tests/test_import_time.py checks only the verdict's logic).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import common
from benchmarks import versions

ROOT = Path(__file__).resolve().parents[1]

# name -> module imported by the child
MODULES = {"ewc_jax": "ewc_jax", "cli": "experiments.split_mnist", "jax": "jax",
           "ml_dtypes": "ml_dtypes"}
# name -> budget (s) for the median CPU seconds of its import; see the module docstring.
BUDGETS_S = {"ewc_jax": 0.85, "cli": 0.95}

CHILD = ("import time; w = time.perf_counter(); c = time.process_time(); import {module}; "
         "print(time.perf_counter() - w, time.process_time() - c)")


def time_import(module: str) -> dict:
  """Wall and CPU seconds of ``import <module>`` in a fresh interpreter (this one's)."""
  out = subprocess.run([sys.executable, "-c", CHILD.format(module=module)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, check=True).stdout
  wall, cpu = (float(v) for v in out.split()[-2:])
  return {"wall_s": wall, "cpu_s": cpu}


def sample(modules: dict[str, str], repeats: int) -> dict[str, list[dict]]:
  """``repeats`` timings of every module, interleaved round robin, after one untimed warm-up."""
  for module in modules.values():
    time_import(module)
  samples = {name: [] for name in modules}
  for _ in range(repeats):
    for name, module in modules.items():
      samples[name].append(time_import(module))
  return samples


def over_budget(timings: dict[str, list[float]], budgets: dict[str, float]) -> list[str]:
  """One phrase per budgeted name whose median timing (s) exceeds its budget (empty: all within).

  A budgeted name without timings is over (nothing shows it is within)."""
  over = []
  for name, budget in budgets.items():
    times = timings.get(name) or []
    if not times:
      over.append(f"{name}: no timings (budget {budget:.2f} s)")
    elif statistics.median(times) > budget:
      over.append(f"{name}: median {statistics.median(times):.2f} s > budget {budget:.2f} s")
  return over


def summary(samples: dict[str, list[dict]]) -> dict:
  """Per name: median and min of the CPU and wall seconds, and the budget (None: unbudgeted)."""
  out = {}
  for name, rows in samples.items():
    wall, cpu = [r["wall_s"] for r in rows], [r["cpu_s"] for r in rows]
    out[name] = {"module": MODULES.get(name, name), "median_cpu_s": statistics.median(cpu),
                 "budget_cpu_s": BUDGETS_S.get(name), "min_cpu_s": min(cpu),
                 "median_wall_s": statistics.median(wall), "min_wall_s": min(wall)}
  return out


def loadavg() -> list[float] | None:
  """The 1/5/15-minute load averages (None where the platform has none)."""
  return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def main(argv: list[str] | None = None) -> int:
  """Times the imports, writes the JSON and returns 1 (with one line on stderr) when over."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7, help="timed imports per module")
  args = parser.parse_args(argv)
  load_before = loadavg()
  samples = sample(MODULES, args.repeats)
  load_after = loadavg()
  over = over_budget({n: [r["cpu_s"] for r in rows] for n, rows in samples.items()}, BUDGETS_S)
  common.write("import_time", {
      "protocol": "fresh `python -c` per sample, wall/CPU seconds of the import alone, modules "
                  f"interleaved round robin after one untimed warm-up each; {args.repeats} "
                  "samples; budgets on the median CPU seconds",
      "repeats": args.repeats, "loadavg_before": load_before, "loadavg_after": load_after,
      "results": summary(samples), "over_budget": over,
      "samples_cpu_wall_s": {n: [[round(r["cpu_s"], 4), round(r["wall_s"], 4)] for r in rows]
                  for n, rows in samples.items()}})
  if over:
    print(f"import_time: OVER BUDGET (median CPU s of the import): {'; '.join(over)} "
          f"(ml_dtypes {versions.version('ml_dtypes')}; benchmarks/results/import_time.json)",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
