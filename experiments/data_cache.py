"""The decoded-array cache of `experiments.data`: two plain `.npy` files per split.

A split's images (uint8 [N, H, W, C]) and labels (int32 [N]) are cached under
`<cache_dir>/datasets/` (`cache_paths`), written atomically (`write_cache`: new file,
rename; a process holding a map of the old one keeps its contents) and read back
memory-mapped (`read_cache`), checked in dtype and shape and, where recorded, against
a SHA-256 content hash of each array (`content_hash`, `recorded_hashes`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import files


def safe_name(part: str) -> str:
  """``part`` with every run of characters other than letters, digits, ``_`` and ``.`` as ``_``."""
  return re.sub(r"[^A-Za-z0-9_.]+", "_", part)


def cache_paths(cache_dir: Path, info: Any, split: str, prepared_dir: str) -> tuple[Path, Path]:
  """The (images, labels) `.npy` files of one split.

  Named by dataset, config, version and split, plus a short hash of the prepared
  folder they were decoded from, so that two data folders holding the same
  dataset version never share (and silently swap) decoded arrays.
  """
  parts = [info.name, info.config_name or "", str(info.version), split]
  folder = hashlib.sha256(os.path.realpath(prepared_dir).encode()).hexdigest()[:10]
  stem = "-".join(safe_name(p) for p in parts if p) + f"-{folder}"
  root = cache_dir / "datasets"
  return root / f"{stem}.images.npy", root / f"{stem}.labels.npy"


def load_npy(path: Path) -> np.ndarray | None:
  """The array in `path`, memory-mapped read-only; None when missing or not a `.npy`."""
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except (OSError, ValueError, EOFError):
    return None  # missing, truncated, corrupt or foreign file: re-decode and overwrite it
  if not isinstance(array, np.ndarray):  # e.g. a zip archive under this name
    with contextlib.suppress(Exception):
      array.close()
    return None
  return np.asarray(array)  # a plain (read-only) ndarray view of the mapping


def content_hash(array: np.ndarray) -> str:
  """`sha256:<hex>` of an array's bytes (C order), as recorded in the index."""
  data = np.ascontiguousarray(array)
  return "sha256:" + hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def read_cache(
  paths: tuple[Path, Path],
  n: int,
  shape: tuple[int, ...],
  hashes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
  """Cached (images, labels), or None when missing, corrupt, not matching in dtype/shape,
  or (given `hashes`) when a file's content hash differs from the recorded one."""
  images, labels = load_npy(paths[0]), load_npy(paths[1])
  if (
    images is None
    or labels is None
    or images.dtype != np.uint8
    or images.shape != (n, *shape)
    or labels.dtype != np.int32
    or labels.shape != (n,)
  ):
    return None
  if hashes is not None and [content_hash(images), content_hash(labels)] != list(hashes):
    return None
  return images, labels


def write_cache(paths: tuple[Path, Path], images: np.ndarray, labels: np.ndarray) -> None:
  """Writes the images and labels `.npy` files, each atomically."""
  for path, array in zip(paths, (images, labels)):
    files.write_atomic(path, lambda f, a=array: np.save(f, a, allow_pickle=False))


def recorded_hashes(folder: Path) -> dict[str, str]:
  """`{cache file name: content hash}` from every index entry in `folder` (a few small
  JSON files): the normal path checks the cache files against them too (the newest entry
  wins where two disagree). A file no entry mentions (the index lost) is re-hashed and
  trusted, as its dtype and shape match."""
  out: dict[str, tuple[int, str]] = {}
  with contextlib.suppress(OSError):
    for path in folder.glob("*.index.json"):
      try:
        entry = json.loads(path.read_bytes())
        mtime = path.stat().st_mtime_ns
        for info in entry["splits"].values():
          for part in ("images", "labels"):
            name, digest = info[part], info[f"{part}_hash"]
            if isinstance(name, str) and isinstance(digest, str):
              if name not in out or out[name][0] < mtime:
                out[name] = (mtime, digest)
      except (OSError, ValueError, KeyError, TypeError, AttributeError):
        continue
  return {name: digest for name, (_, digest) in out.items()}


def warn_mismatch(path: Path) -> None:
  """The one warning line of a cache file that fails its content check."""
  print(
    f"warning: dataset cache file {path} does not match the content hash recorded in its "
    "index (corrupted?); rebuilding it from TFDS",
    file=sys.stderr,
    flush=True,
  )


# --- the index: a repeated request answered without TFDS ---
