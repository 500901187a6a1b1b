"""Test-only: pause a run at a position, so that fault tests kill or signal it deterministically.

Loaded by the subprocesses the fault tests start (``PYTHONPATH`` holds this folder; see
``tests/pause.py``), never by production code. With ``EWC_JAX_TEST_HANG_AT=task:epoch:step`` the
run pauses in the ``on_checkpoint`` hook of that position, after that position's checkpoint (if
any) is committed and before the hook looks for a stop request: it writes ``at`` to the file
``EWC_JAX_TEST_MARKER``, prints one line, and waits until it is killed or a stop is requested
(SIGINT/SIGTERM), which the hook then handles as in a normal run.
"""

import os
import sys
import time
from pathlib import Path


def _install(at: str, marker: str | None) -> None:
  from ewc_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from experiments import signals  # pylint: disable=import-outside-toplevel
  call, requested = checkpoint.RunCheckpointer.__call__, signals.requested
  inside = []  # the (checkpointer, RunState) of the hook calls in progress

  def patched_call(self, rs, reason):
    inside.append((self, rs))
    try:
      return call(self, rs, reason)
    finally:
      inside.pop()

  def patched_requested():
    if inside and inside[-1][1] is not None:
      ckpt, rs = inside[-1]
      if f"{rs.task}:{rs.epoch}:{rs.step}" == at:
        inside[-1] = (ckpt, None)  # once per hook call
        ckpt.wait()  # "after that position's checkpoint is saved": committed, not just started
        if marker:
          Path(marker).write_text(at)
        print(f"[EWC_JAX_TEST_HANG_AT] paused at {at}", file=sys.stderr, flush=True)
        while requested() is None:
          time.sleep(0.05)
    return requested()

  checkpoint.RunCheckpointer.__call__ = patched_call
  signals.requested = patched_requested  # what the command lines give as stop_requested


if os.environ.get("EWC_JAX_TEST_HANG_AT"):
  _install(os.environ["EWC_JAX_TEST_HANG_AT"], os.environ.get("EWC_JAX_TEST_MARKER"))
