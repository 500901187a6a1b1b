"""The index of `experiments.data`: a repeated request answered without TFDS.

After a load, a small JSON entry beside the cached arrays records, for the request
(`index_key`: dataset name as given, data folder, TFDS version), the resolved name and
version, the prepared dataset folder with a fingerprint of it (`fingerprint`: name, size
and mtime of each file in it, and the names next to it), and each split's cache files,
content hashes, count and shape (`entry`, `split_entry`). While the fingerprint still
matches and the cached arrays match the entry, `load_indexed` returns them without
importing `tensorflow_datasets` or opening the dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any
from typing import NamedTuple

import numpy as np

from experiments import data_cache
from experiments import files

FORMAT = 2  # bump when the index entry or the cache files change meaning


class Indexed(NamedTuple):
  """What an index entry gives back: `{split: (images, labels)}`, the name and version."""

  arrays: dict[str, tuple[np.ndarray, np.ndarray]]
  name: str
  version: str


def tfds_version() -> str | None:
  """The installed `tensorflow-datasets` version, without importing it.

  Read from the `*.dist-info/METADATA` beside the package that would be imported
  (~0.2 ms); `importlib.metadata` (~25 ms to import) only when that is ambiguous.
  """
  spec = importlib.util.find_spec("tensorflow_datasets")
  if spec is None or not spec.origin:
    return None
  found = list(Path(spec.origin).parents[1].glob("tensorflow_datasets-*.dist-info/METADATA"))
  if len(found) == 1:
    with contextlib.suppress(OSError), open(found[0], encoding="utf-8") as f:
      for line in f:
        if line.startswith("Version:"):
          return line.split(":", 1)[1].strip()
        if not line.strip():
          break  # end of the headers

  try:
    return metadata.version("tensorflow-datasets")
  except metadata.PackageNotFoundError:
    return None


def index_key(name: str, data_dir: str | None) -> dict[str, Any]:
  """What a request is looked up by: the name as given, the data folder, TFDS's version."""
  key: dict[str, Any] = {
    "name": name,
    "data_dir": os.path.abspath(data_dir) if data_dir is not None else None,
    "tfds_version": tfds_version(),
  }
  if data_dir is None:  # TFDS's own default folder depends on $HOME
    key["tfds_default_data_dir"] = os.path.expanduser(os.path.join("~", "tensorflow_datasets"))
  return key


def index_path(cache_dir: Path, key: dict[str, Any]) -> Path:
  """The entry file of a request: its name and a hash of its whole key."""
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
  return cache_dir / "datasets" / f"{data_cache.safe_name(key['name'])[:40]}-{digest}.index.json"


def fingerprint(prepared_dir: str) -> dict[str, Any] | None:
  """Name, size and mtime_ns of each entry of the prepared folder, and the names beside it.

  The names beside it (the dataset's other version folders) catch a newly prepared
  version that TFDS would now pick. None when the folder cannot be listed.
  """
  try:
    with os.scandir(prepared_dir) as entries:
      files = []
      for entry in entries:
        st = entry.stat()
        files.append([entry.name, st.st_size, st.st_mtime_ns])
    siblings = sorted(os.listdir(os.path.dirname(os.path.normpath(prepared_dir))))
  except OSError:
    return None
  return {"files": sorted(files), "siblings": siblings}


def write_index(path: Path, entry: dict[str, Any]) -> None:
  """Writes an entry (see `entry`) atomically."""
  text = json.dumps(entry, indent=1, sort_keys=True).encode()
  files.write_atomic(path, lambda f: f.write(text))


def plain_name(value: Any) -> bool:
  """Whether `value` is a bare file name (no folder, not `.` or `..`)."""
  return isinstance(value, str) and value not in ("", ".", "..") and Path(value).name == value


def load_indexed(path: Path, key: dict[str, Any], splits: Sequence[str]) -> Indexed | None:
  """The arrays of the index entry at `path`, or None when it does not (still) hold."""
  try:
    entry = json.loads(path.read_bytes())
  except (OSError, ValueError):
    return None
  try:
    if entry["format"] != FORMAT or entry["key"] != key:
      return None
    prepared_dir = entry["prepared_dir"]
    if not isinstance(prepared_dir, str) or fingerprint(prepared_dir) != entry["fingerprint"]:
      return None
    arrays = {}
    for split in splits:
      info = entry["splits"][split]
      n, shape = info["count"], info["image_shape"]
      files = (info["images"], info["labels"])
      hashes = (info["images_hash"], info["labels_hash"])
      if (
        not isinstance(n, int)
        or not isinstance(shape, list)
        or not all(isinstance(d, int) for d in shape)
        or not all(plain_name(f) for f in files)
        or not all(isinstance(h, str) for h in hashes)
      ):
        return None
      cached = data_cache.read_cache(
        (path.parent / files[0], path.parent / files[1]), n, tuple(shape), hashes
      )
      if cached is None:  # missing, damaged or changed: the normal path (it warns)
        return None
      arrays[split] = cached
    name, version = entry["name"], entry["version"]
    if not isinstance(name, str) or not isinstance(version, str):
      return None
  except (KeyError, TypeError):
    return None
  return Indexed(arrays, name, version)


def split_entry(
  paths: tuple[Path, Path], digests: Sequence[str], count: int, shape: tuple[int, ...]
) -> dict[str, Any]:
  """One split's part of an entry: its cache file names, content hashes, count and shape."""
  return {
    "images": paths[0].name,
    "labels": paths[1].name,
    "images_hash": digests[0],
    "labels_hash": digests[1],
    "count": count,
    "image_shape": list(shape),
  }


def entry(
  key: dict[str, Any],
  name: str,
  version: str,
  prepared_dir: str,
  fingerprint: dict[str, Any],
  splits: dict[str, Any],
) -> dict[str, Any]:
  """The entry of a request `key`: what `load_indexed` checks and returns."""
  return {
    "format": FORMAT,
    "key": key,
    "name": name,
    "version": version,
    "prepared_dir": prepared_dir,
    "fingerprint": fingerprint,
    "splits": splits,
  }
