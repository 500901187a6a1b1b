"""Atomic file writes (the run outputs: results, CSV, PNGs; the decoded-data cache) and the
workdir check.

A reader (or a process killed mid-write) never sees a half-written file: the bytes go to a
temporary file in the same folder, are flushed to disk, then renamed over the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def _read_umask() -> int:
  """The process umask (read once, at import: ``os.umask`` can only read it by setting it)."""
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


_UMASK = _read_umask()


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
  """Calls ``write(f)`` on a temporary binary file beside ``path``, fsyncs it, renames it over
  ``path`` (creating the folder if needed); on any error the temporary file is removed."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.chmod(tmp, 0o666 & ~_UMASK)  # the mode a plain open() would give (mkstemp: 0600)
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def write_text(path: Path, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, obj) -> None:
  """Writes ``obj`` as indented JSON to ``path`` atomically."""
  write_text(path, json.dumps(obj, indent=2) + "\n")


def check_workdir(workdir: str | os.PathLike) -> Path:
  """Creates ``workdir`` and checks it is writable, before any work is done
  (:class:`ewc_jax.errors.SettingError` naming ``workdir`` otherwise)."""
  from ewc_jax import errors  # pylint: disable=import-outside-toplevel
  path = Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_"):
      pass
  except OSError as err:
    reason = err.strerror
    raise errors.SettingError(lambda n: f"{n('workdir')}={str(workdir)!r} is not a writable "
                              f"directory ({reason}).") from err
  return path
