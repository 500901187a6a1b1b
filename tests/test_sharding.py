"""Sharded parameters (issue: EWC beyond one device): on 8 forced host devices, meshes (8,) FSDP
and (2, 4) ('data', 'model'), fisher_diagonal, fisher_from_batches, Anchor, ewc_loss and its
gradient, add_ewc_gradient, stack_anchors, merge_anchor and save/restore_anchors keep the
parameters' shardings (each device holds its shard only), equal the unsharded results to 1e-6,
and compile no all-gather of a whole parameter (tests/sharded_check.py, in its own process: the
device count is fixed when JAX starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from tests.xla_flags import with_xla_flags as _with_xla_flags

HERE = Path(__file__).resolve().parent


def test_sharded_parameters_keep_their_shardings_and_values():
  env = {**os.environ, "XLA_FLAGS": _with_xla_flags("--xla_force_host_platform_device_count=8"),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(HERE.parent)}
  proc = subprocess.run([sys.executable, str(HERE / "sharded_check.py")], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["(8,)"] == [] and result["(2, 4)"] == [], result
