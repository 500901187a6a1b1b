"""The versions of Python and of every dependency whose version moves a benchmark's numbers.

The one place that names them: ``benchmarks.common.write`` puts ``versions()`` into every
benchmark's JSON, and ``benchmarks/peers/run.py`` (stdlib only, another interpreter) runs this
file with ours' interpreter to record what ours ran with:

    python benchmarks/versions.py [extra distributions ...]   # one JSON object on stdout

Stdlib only (``importlib.metadata``): nothing is imported, so asking costs no import time. A
distribution that is not installed is recorded as ``null``. ml_dtypes is here because one of its
releases alone added ~0.6 s to every process (issue 27, see ``pyproject.toml``).
"""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata

DISTRIBUTIONS = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
                 "ml_dtypes", "tensorflow-datasets", "array-record")


def version(dist: str) -> str | None:
  """The installed version of distribution ``dist``, or ``None`` when it is not installed."""
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return None


def versions(extra: tuple[str, ...] = ()) -> dict:
  """``{"python": ..., <distribution>: <version or None>, ...}`` for ``DISTRIBUTIONS + extra``."""
  return {"python": platform.python_version(),
          **{dist: version(dist) for dist in (*DISTRIBUTIONS, *extra)}}


if __name__ == "__main__":
  print(json.dumps(versions(tuple(sys.argv[1:]))))
