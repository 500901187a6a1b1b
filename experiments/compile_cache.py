"""JAX's persistent compilation cache, under the data cache folder (a second run compiles
nothing)."""

from __future__ import annotations

from pathlib import Path


def enable() -> Path:
  """Turns the cache on for every compiled program of this process; returns its folder."""
  import jax  # pylint: disable=import-outside-toplevel

  from experiments import data  # pylint: disable=import-outside-toplevel
  path = data.default_cache_dir() / "xla"
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
