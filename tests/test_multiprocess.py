"""EWC across several processes (``jax.distributed``) on localhost: 2 processes with 4 host
devices each, one global mesh of 8 devices. tests/multiprocess_check.py (each process) checks
fisher_diagonal, fisher_from_batches fed by every process's own rows, Anchor, ewc_loss and its
gradient, add_ewc_gradient, stack_anchors, merge_anchor and save/restore_anchors against one
unsharded device (1e-6, shardings kept), and the refusals of values only one process holds.
A process that fails makes the test fail at once with its stderr, its peers killed (no hang on
a peer waiting in a collective)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CHECK = HERE / "multiprocess_check.py"
PROCESSES = 2
TIMEOUT_S = 300  # the whole run, should no process fail and none finish (~40 s at load 1)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(folder: Path, *extra: str, timeout: float = TIMEOUT_S) -> list[str]:
  """Runs PROCESSES copies of the check, one per process id; their stdouts, or an
  AssertionError with the stderr of the first to fail (the others killed) or of all on
  timeout."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HERE.parent)}
  port = _free_port()
  procs, logs = [], []
  for i in range(PROCESSES):
    out, err = folder / f"out{i}.txt", folder / f"err{i}.txt"
    logs.append((out, err))
    with open(out, "w") as o, open(err, "w") as e:
      procs.append(subprocess.Popen(
          [sys.executable, str(CHECK), str(port), str(i), str(PROCESSES), str(folder), *extra],
          env=env, stdout=o, stderr=e, stdin=subprocess.DEVNULL))
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


def test_two_processes_give_the_single_process_results(tmp_path):
  outs = run_processes(tmp_path)
  results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
  assert [r["process"] for r in results] == list(range(PROCESSES))
  for r in results:
    assert r["(8,)"] == [] and r["(2, 4)"] == [], r


def test_a_failing_process_fails_the_run_at_once_with_its_stderr(tmp_path):
  start = time.monotonic()
  with pytest.raises(AssertionError, match=r"process 1 exited with 1:[\s\S]*fails on purpose"):
    run_processes(tmp_path, "fail1", timeout=60)
  assert time.monotonic() - start < 60
