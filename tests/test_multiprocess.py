"""EWC across several processes (``jax.distributed``) on localhost: 2 processes with 4 host
devices each, one global mesh of 8 devices. tests/multiprocess_check.py (each process) checks
fisher_diagonal (also with padding rows masked out), fisher_from_batches fed by every process's
own rows, Anchor, ewc_loss and its gradient, add_ewc_gradient, stack_anchors, merge_anchor and
save/restore_anchors against one unsharded device (1e-6, shardings kept), and the refusals of
values only one process holds.
The program of docs/multihost.md runs as documented, on 2 processes as on 1. A process that
fails makes the test fail at once with its stderr, its peers killed (no hang on a peer waiting
in a collective)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.xla_flags import with_xla_flags as _with_xla_flags

HERE = Path(__file__).resolve().parent
CHECK = HERE / "multiprocess_check.py"
DOC = HERE.parent / "docs" / "multihost.md"
PROCESSES = 2
TIMEOUT_S = 300  # the whole run, should no process fail and none finish (~40 s at load 1)


def _free_ports(count: int) -> list[int]:
  """``count`` distinct free ports (their sockets held open together while chosen)."""
  socks = [socket.socket() for _ in range(count)]
  try:
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def _env(devices: int) -> dict:
  return {**os.environ, "XLA_FLAGS": _with_xla_flags(f"--xla_force_host_platform_device_count={devices}"),
          "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HERE.parent)}


def run_processes(folder: Path, commands: list[tuple[list[str], dict]],
                  timeout: float = TIMEOUT_S) -> list[str]:
  """Runs every ``(argv, env)`` at once; their stdouts, or an AssertionError with the stderr of
  the first to fail (the others killed at once) or of all on timeout."""
  procs, logs = [], []
  for i, (argv, env) in enumerate(commands):
    out, err = folder / f"out{i}.txt", folder / f"err{i}.txt"
    logs.append((out, err))
    with open(out, "w") as o, open(err, "w") as e:
      procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=o, stderr=e,
                                    stdin=subprocess.DEVNULL))
  deadline = time.monotonic() + timeout
  failed = None
  try:
    while failed is None:
      codes = [p.poll() for p in procs]
      failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
      if failed is None and all(c == 0 for c in codes):
        return [out.read_text() for out, _ in logs]
      if failed is None and time.monotonic() > deadline:
        tails = "\n".join(f"--- process {i}:\n{err.read_text()[-2000:]}"
                          for i, (_, err) in enumerate(logs))
        raise AssertionError(f"no result after {timeout} s:\n{tails}")
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  raise AssertionError(f"process {failed} exited with {procs[failed].returncode}:\n"
                       f"{logs[failed][1].read_text()[-3000:]}")


def _check_commands(folder: Path, *extra: str) -> list[tuple[list[str], dict]]:
  port, = _free_ports(1)
  return [([str(CHECK), str(port), str(i), str(PROCESSES), str(folder), *extra], _env(4))
          for i in range(PROCESSES)]


@pytest.mark.extended
def test_two_processes_give_the_single_process_results(tmp_path):
  outs = run_processes(tmp_path, _check_commands(tmp_path))
  results = [json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))
             for out in outs]
  assert [r["process"] for r in results] == list(range(PROCESSES))
  for r in results:
    assert r["(8,)"] == [] and r["(2, 4)"] == [], r


def test_a_failing_process_fails_the_run_at_once_with_its_stderr(tmp_path):
  start = time.monotonic()
  with pytest.raises(AssertionError, match=r"process 1 exited with 1:[\s\S]*fails on purpose"):
    run_processes(tmp_path, _check_commands(tmp_path, "fail1"), timeout=60)
  assert time.monotonic() - start < 60


def test_the_documented_recipe_runs_on_two_processes_as_on_one(tmp_path):
  """docs/multihost.md's program, 2 processes x 4 devices and 1 process x 8 devices at once:
  the same Fisher and EWC penalty."""
  blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
  assert len(blocks) == 1
  script = tmp_path / "ewc_multihost.py"
  script.write_text(blocks[0])
  two, one = _free_ports(2)
  (tmp_path / "two").mkdir()
  (tmp_path / "one").mkdir()
  outs = run_processes(tmp_path, [
      ([str(script), f"127.0.0.1:{two}", "2", "0", str(tmp_path / "two")], _env(4)),
      ([str(script), f"127.0.0.1:{two}", "2", "1", str(tmp_path / "two")], _env(4)),
      ([str(script), f"127.0.0.1:{one}", "1", "0", str(tmp_path / "one")], _env(8))])
  printed = [[json.loads(line) for line in out.splitlines() if line.startswith("{")]
             for out in outs]                      # (gloo logs its connections to stdout)
  assert [len(p) for p in printed] == [1, 0, 1]    # process 0 prints, process 1 does not
  got, want = printed[0][0], printed[2][0]
  assert set(got) == {"fisher_sum", "penalty"}
  assert want["fisher_sum"] > 0 and want["penalty"] > 0
  for name in got:
    assert abs(got[name] - want[name]) <= 1e-5 * abs(want[name]), (got, want)


def test_the_device_side_checks_find_what_the_host_side_ones_find():
  """The searches run for arrays no process can read whole (labels out of range, negative or
  non-finite importance) give the first bad entry and the count that the host path names."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from ewc_jax import fisher_checks, validation  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for trial in range(4):
    labels = rng.integers(-2, 7, (12, 3)).astype(np.int32)
    weights = (rng.random(12) > 0.3).astype(np.float32) if trial % 2 else None
    lmask = (rng.random((12, 3)) > 0.3).astype(np.float32) if trial > 1 else None
    count, row, value = (int(v) for v in fisher_checks.labels_out_of_range(
        jnp.asarray(labels), None if weights is None else jnp.asarray(weights),
        None if lmask is None else jnp.asarray(lmask), 5))
    assert count > 0
    with pytest.raises(ValueError, match=re.escape(f"labels[{row}]={value} ({count} labels")):
      fisher_checks.check_labels(labels, weights, lmask, 5)
  for bad in (-0.5, np.nan, np.inf):
    imp = rng.random((5, 4)).astype(np.float32)
    imp[3, 1], imp[4, 0] = bad, -1.0
    count, value = validation._first_negative_or_non_finite(  # pylint: disable=protected-access
        jnp.asarray(imp))
    assert int(count) == 2
    with pytest.raises(ValueError, match=re.escape(f"has value {validation._fmt(value)}")):  # pylint: disable=protected-access
      validation.check_importance("F", {"w": imp})
