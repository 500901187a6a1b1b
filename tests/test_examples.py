"""examples/continual_finetune_transformer.py: its reduced run end to end (a subprocess, as a user
runs it) and its pieces (flags, data, the brute-force sequence Fisher with padding)."""

import functools
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "continual_finetune_transformer.py"
ROWS = ("before fine-tuning", "plain fine-tuning on B", "EWC fine-tuning on B")


@functools.cache
def _example():
  """The example as a module (examples/ is no package); registered in sys.modules, as the
  dataclass decorator needs."""
  name = "continual_finetune_transformer"
  spec = importlib.util.spec_from_file_location(name, EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def _table(stdout):
  """{row title: (A loss, A acc, B loss, B acc)} from the printed summary."""
  table = {}
  for title in ROWS:
    match = re.search(rf"^{re.escape(title)}\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", stdout, re.M)
    assert match, f"no row {title!r} in:\n{stdout}"
    table[title] = tuple(float(v) for v in match.groups())
  return table


@pytest.mark.slow
def test_quick_run_prints_the_numbers_and_ewc_forgets_less():
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, str(EXAMPLE), "--quick"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = _table(proc.stdout)
  for a_loss, a_acc, b_loss, b_acc in table.values():
    assert np.isfinite([a_loss, b_loss]).all() and 0 <= a_acc <= 1 and 0 <= b_acc <= 1
  before, plain, ewc = (table[t] for t in ROWS)
  assert plain[2] < before[2]      # plain fine-tuning learns B ...
  assert plain[0] > before[0]      # ... and forgets A
  assert ewc[0] < plain[0]         # EWC keeps A's loss lower (a wide margin in the quick run)
  assert "wall time" in proc.stdout


def test_flags_fill_the_config():
  ex = _example()
  assert ex.parse_config([]) == ex.Config()
  quick = ex.parse_config(["--quick", "--lam=3", "--seed=2"])
  assert quick.lam == 3.0 and quick.seed == 2 and quick.d_model == ex.QUICK["d_model"]


def test_domains_are_deterministic_and_distinct():
  ex = _example()
  docs, code = ex.stdlib_domains(20_000)
  assert len(docs) == len(code) == 20_000 and (docs, code) == ex.stdlib_domains(20_000)
  assert code.count("def ") > 5 * max(docs.count("def "), 1)
  a = ex.make_domain(docs, 32, 50, jax.random.key(0))
  again = ex.make_domain(docs, 32, 50, jax.random.key(0))
  assert a.train.shape[1] == 33 and len(a.test) == 50 and a.train.max() < 256
  np.testing.assert_array_equal(a.train, again.train)
