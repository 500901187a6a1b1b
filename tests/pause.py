"""The environment that makes a CLI subprocess pause at a position (tests/hooks/sitecustomize.py)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOKS = Path(__file__).resolve().parent / "hooks"


def pause_env(at: str, marker) -> dict:
  """``{EWC_JAX_TEST_HANG_AT, EWC_JAX_TEST_MARKER, PYTHONPATH}`` for a subprocess's env."""
  return {"EWC_JAX_TEST_HANG_AT": at, "EWC_JAX_TEST_MARKER": str(marker),
          "PYTHONPATH": os.pathsep.join([str(HOOKS), str(ROOT)])}


def marker_path(workdir, at: str) -> Path:
  """The marker file of a run of ``workdir`` paused at ``at`` (beside the workdir)."""
  return Path(workdir).parent / f"marker-{Path(workdir).name}-{at.replace(':', '_')}"


def start_paused(cmd, env: dict, at: str, marker, timeout: float = 300):
  """Starts ``cmd`` (its ``env`` from :func:`pause_env`) and waits until it pauses at ``at``;
  returns the process, still running (its marker file removed)."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  import pytest  # pylint: disable=import-outside-toplevel
  marker = Path(marker)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + timeout
  while not marker.exists():
    if proc.poll() is not None:
      pytest.fail(f"exited {proc.returncode} before pausing at {at}: {proc.stderr.read()[-3000:]}")
    assert time.monotonic() < deadline, f"never paused at {at}"
    time.sleep(0.05)
  marker.unlink()
  return proc
