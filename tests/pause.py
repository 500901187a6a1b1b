"""The environment that makes a CLI subprocess pause at a position (tests/hooks/sitecustomize.py)."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOKS = Path(__file__).resolve().parent / "hooks"


def pause_env(at: str, marker) -> dict:
  """``{EWC_JAX_TEST_HANG_AT, EWC_JAX_TEST_MARKER, PYTHONPATH}`` for a subprocess's env."""
  return {"EWC_JAX_TEST_HANG_AT": at, "EWC_JAX_TEST_MARKER": str(marker),
          "PYTHONPATH": os.pathsep.join([str(HOOKS), str(ROOT)])}
