"""An exclusive lock on a workdir for the whole run: two runs never write into one folder.

    with lock.hold(workdir):      # raises WorkdirLocked (a ValueError: one line, exit 2)
      ...                         # every read and write of the workdir

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<workdir>/.lock``. The operating system
releases it when the process ends in any way (also ``kill -9``, a crash or a lost node of a
local file system), so a stale lock file never blocks: only a live process holds the lock. The
holder writes its pid into the file, which the refused run names. ``flock`` locks belong to an
open file, so a second ``hold`` of the same folder in the same process is refused as well.
(On network file systems without ``flock`` support the lock may not be exclusive across hosts.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".lock"


class WorkdirLocked(ValueError):
  """Another live process holds the workdir's lock."""

  def __init__(self, message: str, pid: int | None):
    super().__init__(message)
    self.pid = pid


def _holder(fd: int) -> int | None:
  try:
    text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    return int(text) if text else None
  except (OSError, ValueError):
    return None


def acquire(workdir: str | os.PathLike, flag: str = "--workdir") -> int:
  """Takes the lock of ``workdir`` (an existing folder); returns the lock file's descriptor,
  to be given to :func:`release`. Raises :class:`WorkdirLocked` when a live process holds it."""
  path = Path(workdir) / LOCK_NAME
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  except OSError as err:
    raise ValueError(f"{flag}={str(workdir)!r}: cannot create the lock file {path} "
                     f"({err.strerror}).") from err
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as err:
    pid = _holder(fd)
    os.close(fd)
    if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise ValueError(f"{flag}={str(workdir)!r}: cannot lock {path} ({err.strerror}).") from err
    who = f"pid {pid}" if pid is not None else "a process that is starting"
    raise WorkdirLocked(
        f"{flag}={str(workdir)!r} is in use by another run ({who} holds {path}); wait for it "
        f"to finish, stop it, or use another {flag}.", pid) from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
  return fd


def release(fd: int) -> None:
  """Releases the lock (the file stays: a stale file never blocks)."""
  with contextlib.suppress(OSError):
    fcntl.flock(fd, fcntl.LOCK_UN)
  with contextlib.suppress(OSError):
    os.close(fd)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, flag: str = "--workdir") -> Iterator[None]:
  """The lock of ``workdir`` for the duration of the ``with`` block."""
  fd = acquire(workdir, flag)
  try:
    yield
  finally:
    release(fd)
