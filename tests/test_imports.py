"""``import ewc_jax`` (the library's pure functions) loads neither the runner nor its heavy deps."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_ewc_jax_loads_no_flax_linen_orbax_or_tfds():
  code = ("import ewc_jax, sys; print(sorted(m for m in ('flax.linen', 'orbax', "
          "'orbax.checkpoint', 'tensorflow_datasets', 'ewc_jax.continual') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=True).stdout.strip()
  assert out == "[]", out
