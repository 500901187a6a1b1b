"""An exclusive lock on a workdir for the whole run: two runs never write into one folder.

    with lock.hold(workdir):      # raises WorkdirLocked (a ValueError: one line, exit 2)
      ...                         # every read and write of the workdir

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<workdir>/.lock``. The operating system
releases it when the process ends in any way (also ``kill -9``, a crash or a lost node of a
local file system), so a stale lock file never blocks: only a live process holds the lock. The
holder writes its pid into the file, which the refused run names, and removes the file when it
lets the lock go (a run that ends normally, with an error or on a signal leaves no lock file;
only ``kill -9`` does). A file removed between another process's ``open`` and its ``flock`` is
detected (its inode is no longer the path's) and the lock is taken again on the new file. ``flock`` locks belong to an
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

from experiments import signals

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


def _same_file(fd: int, path: Path) -> bool:
  """Whether ``fd`` is still the file at ``path`` (not removed or replaced by its holder)."""
  try:
    return os.fstat(fd).st_ino == os.stat(path).st_ino
  except OSError:
    return False


def acquire(workdir: str | os.PathLike, flag: str = "--workdir") -> int:
  """Takes the lock of ``workdir`` (an existing folder); returns the lock file's descriptor,
  to be given to :func:`release`. Raises :class:`WorkdirLocked` when a live process holds it."""
  path = Path(workdir) / LOCK_NAME
  while True:
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
    if _same_file(fd, path):
      break
    os.close(fd)  # the holder removed the file as we opened it: lock the new one
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
  return fd


def release(fd: int, path: str | os.PathLike | None = None) -> None:
  """Releases the lock; with ``path`` (the lock file), removes that file first if it is still
  the locked one."""
  if path is not None and _same_file(fd, Path(path)):
    with contextlib.suppress(OSError):
      os.unlink(path)
  with contextlib.suppress(OSError):
    fcntl.flock(fd, fcntl.LOCK_UN)
  with contextlib.suppress(OSError):
    os.close(fd)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, flag: str = "--workdir") -> Iterator[None]:
  """The lock of ``workdir`` for the duration of the ``with`` block; the lock file is removed
  at its end, and if the process ends inside it (:mod:`experiments.signals`)."""
  fd = acquire(workdir, flag)
  path, released = Path(workdir) / LOCK_NAME, []

  def let_go():  # once: the descriptor number may be reused after its close
    if not released:
      released.append(True)
      release(fd, path)

  try:
    with signals.cleanup(let_go):
      yield
  finally:
    let_go()
