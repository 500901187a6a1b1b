"""Orbax, imported only when a checkpoint is read or written, and its error noise kept quiet.

Shared by the run checkpoints (:mod:`ewc_jax.checkpoint`) and the anchor files
(:mod:`ewc_jax.anchor_io`): a user error there stays one line.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import sys
import threading
import time
import traceback


def ocp():
  """``orbax.checkpoint``, imported on first use."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp


def _closed_loop(exc: BaseException | None) -> bool:
  """Whether ``exc`` is the error of a callback run on orbax's closed event loop."""
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class _ClosedLoopFilter:
  """The ``sys.unraisablehook`` of an open :func:`closed_loop_noise_dropped` scope: drops the
  closed-loop message, hands everything else to the hook it replaced. Inert once its scope
  closed (it stays in the chain only if another hook was installed over it meanwhile)."""

  def __init__(self, previous):
    self.previous = previous
    self.active = True
    self.last_drop: float | None = None  # time.monotonic() of the latest message dropped

  def __call__(self, unraisable) -> None:
    if self.active and _closed_loop(unraisable.exc_value):
      self.last_drop = time.monotonic()
      return
    self.previous(unraisable)

  def filter(self, record: logging.LogRecord) -> bool:
    """The asyncio logger's filter: drops "Task/Future exception was never retrieved" of the
    same failed reads (the tasks and futures orbax left behind on a failed restore log their
    error again, with a traceback, when they are freed)."""
    if self.active and str(record.msg).endswith("exception was never retrieved"):
      self.last_drop = time.monotonic()
      return False
    return True


class _LateFailures(logging.Filter):
  """asyncio's "exception was never retrieved" records of the futures of a failed read or write,
  logged after its scope closed (orbax keeps some until the interpreter exits): dropped when
  they name a folder whose read or write failed, the only ones this filter knows. Installed on
  the asyncio logger at the first such failure; a process without one never has it."""

  def __init__(self):
    super().__init__()
    self.folders: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    text = str(record.msg)
    return not (text.startswith(("Task exception was never retrieved",
                                 "Future exception was never retrieved"))
                and any(f in text for f in self.folders))


_LATE = _LateFailures()
_LOCK = threading.Lock()
_scopes = 0                                # closed_loop_noise_dropped scopes open now
_filter: _ClosedLoopFilter | None = None   # installed by the outermost of them


@contextlib.contextmanager
def closed_loop_noise_dropped():
  """While open, drops orbax's harmless "RuntimeError: Event loop is closed" tracebacks.

  When orbax fails to read a damaged checkpoint, the reads still in flight complete on its
  already closed event loop, and tensorstore's callbacks report that error, with a traceback,
  through ``sys.unraisablehook`` (nothing is written; the failure itself reaches the caller as
  one error). The outermost scope installs a filter of exactly that message on
  ``sys.unraisablehook`` and its end puts the previous hook back, so the process's hooks are
  unchanged outside the scopes (the same for asyncio's "exception was never retrieved" log
  records of those reads). Scopes nest and may overlap across threads; the run
  checkpointers hold one while their orbax manager is open, :func:`ewc_jax.restore_anchors`
  while it reads. A failed read calls :func:`wait_for_failed_reads` inside its scope, so that
  the late messages arrive while the filter is still there.
  """
  global _scopes, _filter  # pylint: disable=global-statement
  with _LOCK:
    if _scopes == 0:
      _filter = _ClosedLoopFilter(sys.unraisablehook)
      sys.unraisablehook = _filter
      logging.getLogger("asyncio").addFilter(_filter)
    _scopes += 1
  try:
    yield
  finally:
    if _scopes == 1 and _filter is not None and _filter.last_drop is not None:
      _settle(_filter)  # a read failed in the scope: its late messages come before it closes
    with _LOCK:
      _scopes -= 1
      if _scopes == 0:
        previous_filter, _filter.active = _filter, False
        if sys.unraisablehook is _filter:
          sys.unraisablehook = _filter.previous
        _filter = None
        logging.getLogger("asyncio").removeFilter(previous_filter)


def wait_for_failed_reads(err: BaseException | None = None, where: str | None = None,
                          quiet: float = 0.25, limit: float = 2.0) -> None:
  """After orbax failed to read or write (``err``): waits until what it left in flight stopped
  reporting on its closed event loop (no message for ``quiet`` seconds; they come within
  milliseconds of the failure), at most ``limit`` seconds, then lets their asyncio tasks go.

  Those tasks are held by the frames of ``err``'s traceback (and sit in reference cycles): when
  they are finally freed, asyncio logs "Task exception was never retrieved" for each. Their
  frames' locals are cleared and the cycles collected here, while the filter of the scope is in
  place (the traceback keeps its lines). The futures that orbax keeps until the interpreter
  exits log the same when they go: those whose error names ``where`` (the folder that failed)
  are dropped by :class:`_LateFailures`. Outside a :func:`closed_loop_noise_dropped` scope it
  returns at once."""
  active = _filter
  if active is None:
    return
  seen = set()
  while err is not None and id(err) not in seen:  # the error and what it was raised from
    seen.add(id(err))
    traceback.clear_frames(err.__traceback__)
    err = err.__cause__ or err.__context__
  active.last_drop = active.last_drop or time.monotonic()  # a read failed: settle at the end
  if where:
    with _LOCK:
      if not _LATE.folders:
        logging.getLogger("asyncio").addFilter(_LATE)
      _LATE.folders.add(str(where))
  _settle(active, quiet, limit)


def _settle(active: _ClosedLoopFilter, quiet: float = 0.25, limit: float = 2.0) -> None:
  """Collects cycles and waits until no late message came for ``quiet`` s (at most ``limit``)."""
  start = time.monotonic()
  while True:
    gc.collect()
    now = time.monotonic()
    idle = now - max(start, active.last_drop or start)
    if idle >= quiet or now - start >= limit:
      break
    time.sleep(quiet - idle)


def first_line(err: BaseException, limit: int = 400) -> str:
  """``"Type: first line of the message"``: an orbax/tensorstore error within one line (without
  tensorstore's ``[source locations=...]`` / ``[tensorstore_spec=...]`` annotations; longer
  than ``limit`` characters: its start and its end, where the OS's reason is)."""
  text = str(err).strip()
  line = re.sub(r"\s*\[(source locations|tensorstore_spec)='.*?'\]", "",
                text.splitlines()[0] if text else "")
  line = f"{type(err).__name__}: {line}".rstrip(": ")
  return line if len(line) <= limit else f"{line[:limit // 2 - 2]} ... {line[-(limit // 2 - 3):]}"


__all__ = ["closed_loop_noise_dropped", "first_line", "ocp", "wait_for_failed_reads"]
