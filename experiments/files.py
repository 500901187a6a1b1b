"""Atomic file writes (the run outputs: results, CSV, PNGs; the decoded-data cache) and the
workdir check.

A reader (or a process killed mid-write) never sees a half-written file: the bytes go to a
temporary file in the same folder, are flushed to disk, then renamed over the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO
from typing import Callable
from typing import Iterator

from ewc_jax import errors
from experiments import signals


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
  (:class:`ewc_jax.errors.SettingError` naming ``workdir`` otherwise; an empty path too: it
  would mean the current folder)."""
  if not str(workdir).strip():
    raise errors.SettingError(lambda n: f"{n('workdir')}={str(workdir)!r} is invalid: expected "
                              "a folder path (use --workdir=. for the current folder).")
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


def _missing_folders(path: Path) -> list[Path]:
  """``path`` and its ancestors that do not exist yet, deepest first."""
  out = []
  for p in [path, *path.parents]:
    if p.exists() or p == p.parent:
      break
    out.append(p)
  return out


def _remove_if_empty(folders: list[Path]) -> None:
  for p in folders:  # deepest first; stops at the first one holding anything
    try:
      p.rmdir()
    except OSError:
      return


@contextlib.contextmanager
def workdir_claimed(workdir: str | os.PathLike) -> Iterator[Path]:
  """:func:`check_workdir` for the ``with`` block: if the block fails (or the process ends in
  it, :mod:`experiments.signals`), the folders it created are removed again when nothing was
  written into them, so a refused or interrupted run leaves nothing behind."""
  created = _missing_folders(Path(os.path.abspath(workdir))) if str(workdir).strip() else []
  path = check_workdir(workdir)
  ok = False
  try:
    with signals.cleanup(lambda: _remove_if_empty(created)):
      yield path
    ok = True
  finally:
    if not ok:
      _remove_if_empty(created)


def checkpoint_dirs(root: str | os.PathLike, pattern: str = "seed_*") -> list[Path]:
  """The per-run checkpoint folders under ``root`` (``root/seed_<s>``; a sweep's:
  ``pattern="**/chunk_*"``) that hold anything."""
  root = Path(root)
  if not root.is_dir():
    return []
  return sorted(p for p in root.glob(pattern) if p.is_dir() and any(p.iterdir()))


def discard(root: str | os.PathLike) -> bool:
  """Removes every checkpoint under ``root`` (``--force_restart``); True when there were any."""
  root = Path(root)
  if not root.exists():
    return False
  shutil.rmtree(root)
  return True
