"""JAX's persistent compilation cache, under the data cache folder (a second run compiles
nothing)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from ewc_jax import continual
from experiments import data
from experiments import executable_cache

if TYPE_CHECKING:
  from experiments import executable_cache


def enable() -> Path:
  """Turns the cache on for every compiled program of this process; returns its folder."""

  path = data.default_cache_dir() / "xla"
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


# The jax settings that change what a traced program computes.
_JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_threefry_partitionable",
                 "jax_default_prng_impl", "jax_numpy_dtype_promotion", "jax_numpy_rank_promotion")
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "chex")


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
  """sha256 over the source of ``ewc_jax`` and ``experiments`` (every ``.py``, path and text)."""
  root = Path(__file__).resolve().parents[1]
  digest = hashlib.sha256()
  for package in ("ewc_jax", "experiments"):
    for path in sorted((root / package).rglob("*.py")):
      digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
  return digest.hexdigest()


def _array_signature(tree) -> list:
  return [[list(a.shape), str(a.dtype)] for a in jax.tree.leaves(tree)]


def executables(parts: dict, *arrays) -> executable_cache.Cached:
  """The store of compiled programs (under the data cache folder) and the key of a run's
  programs: a hash of ``parts`` (JSON: the settings they are built from), the shapes and dtypes
  of ``arrays`` (the pytrees they take), this checkout's source code, the installed versions
  of jax/jaxlib/flax/optax/numpy/chex, the devices, ``XLA_FLAGS`` and the jax settings that
  change what a program computes. A change to any of them is another key."""



  def version(package):
    try:
      return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      return None

  devices = jax.devices()
  whole = {"parts": parts, "arrays": [_array_signature(a) for a in arrays],
           "code": _code_digest(), "versions": {p: version(p) for p in _PACKAGES},
           "devices": [devices[0].platform, devices[0].device_kind, len(devices),
                       jax.process_count()],
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "settings": {s: str(getattr(jax.config, s, None)) for s in _JAX_SETTINGS}}
  text = json.dumps(whole, sort_keys=True, default=_exact)
  key = hashlib.sha256(text.encode()).hexdigest()[:40]
  return executable_cache.Cached(executable_cache.Folder(data.default_cache_dir() / "executables"),
                                 key)


def run_executables(config, run, built, preprocess, train, test, *,
                    dynamic_p: bool = False) -> executable_cache.Cached:
  """The store and key of the programs of ``run`` (an experiment's ``continual.Config``):
  they are built from its settings but the programs' arguments
  (``continual.program_arguments(dynamic_p)``: the seed's PRNG keys, λ, γ and the learning
  rate, and p when a sweep varies it), the class groups (class-incremental: the classes each
  task makes active; otherwise only their sizes shape the heads, so seeds with their own
  shuffled pairs share the programs), the input normalisation (``config.input_norm_name`` and ``preprocess``'s statistics) and the
  shapes of ``train`` / ``test``."""

  arguments = continual.program_arguments(dynamic_p)
  settings = {k: v for k, v in dataclasses.asdict(run).items() if k not in arguments}
  norm = {"name": config.input_norm_name, "mean": getattr(preprocess, "mean", None),
          "std": getattr(preprocess, "std", None)}
  groups = ([list(map(int, g)) for g in built.class_groups] if run.scenario == "class"
            else [len(g) for g in built.class_groups])
  parts = {"run": settings, "class_groups": groups, "input_norm": norm}
  return executables(parts, train, test)


def _exact(value):
  """JSON for what ``json`` cannot write: arrays in full (every bit of a float32 counts)."""
  if isinstance(value, np.ndarray | np.generic):
    return {"dtype": str(value.dtype), "shape": list(np.shape(value)),
            "hex": np.ascontiguousarray(value).tobytes().hex()}
  raise TypeError(f"{type(value).__name__} is not part of a compiled program's key")
