"""benchmarks/import_time.py's verdict and the versions every benchmark JSON records (no timing
asserts: the import times themselves are the benchmark's business)."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import import_time
from benchmarks import versions

ROOT = Path(__file__).resolve().parents[1]


def test_within_budget_when_the_median_is():
  budgets = {"ewc_jax": 1.0, "cli": 1.2}
  # one slow outlier each: the median is what is judged
  timings = {"ewc_jax": [0.7, 0.8, 5.0], "cli": [0.9, 9.0, 1.1], "jax": [99.0]}
  assert import_time.over_budget(timings, budgets) == []


def test_over_budget_names_each_import_over_its_budget():
  over = import_time.over_budget({"ewc_jax": [1.2, 1.3, 0.1], "cli": [1.0, 1.1, 1.2]},
                                 {"ewc_jax": 1.0, "cli": 1.2})
  assert over == ["ewc_jax: median 1.20 s > budget 1.00 s"]


def test_a_budgeted_import_without_timings_is_over():
  over = import_time.over_budget({"ewc_jax": [0.5]}, {"ewc_jax": 1.0, "cli": 1.2})
  assert over == ["cli: no timings (budget 1.20 s)"]


def test_every_import_it_times_is_importable_and_every_budget_names_one():
  assert set(import_time.BUDGETS_S) <= set(import_time.MODULES)
  assert {"ewc_jax", "cli"} <= set(import_time.BUDGETS_S)


def test_versions_names_every_dependency_and_runs_standalone():
  want = {"python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
          "ml_dtypes", "tensorflow-datasets", "array-record"}
  assert want <= set(versions.versions())
  # as benchmarks/peers/run.py runs it: a script, another interpreter, extra distributions
  out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "versions.py"), "no-such-dist"],
                       capture_output=True, text=True, timeout=60, check=True).stdout
  doc = json.loads(out)
  assert want <= set(doc) and doc["no-such-dist"] is None and doc["jax"]
