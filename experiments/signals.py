"""Signals and the process's end, from its first line to its last (standard library only).

A command line calls :func:`install` first thing, before its heavy imports (JAX, TFDS, orbax:
seconds, more under load): from then on SIGINT (Ctrl-C) and SIGTERM end the process at once,
with one line on stderr and status 130 / 143, whatever it is doing (importing, parsing,
compiling). Nothing is half-written then: the outputs are written atomically, and the
workdir's lock file and a workdir this process created and left empty are removed (the
:func:`cleanup` callbacks registered by :mod:`experiments.lock` and :mod:`experiments.files`).
Once training starts, :func:`catch` takes over: the first SIGINT or SIGTERM (what cluster
schedulers send before preempting) only *requests* a stop (:func:`requested`, the
``stop_requested`` of :class:`ewc_jax.checkpoint.RunCheckpointer` and of
:func:`ewc_jax.interrupt.stop_hook`): the run goes on to the end of the current train chunk or
task, saves that position and raises :class:`ewc_jax.interrupt.Interrupted`; the command line
prints :func:`interrupted_line` and exits :func:`exit_code` (130 / 143). A second signal while
the first is pending ends the process at once (nothing more saved; checkpoints are atomic, so
the last complete one stays the newest). The handlers of :func:`install` come back after.

:func:`exit_now` is the end of every command line, success or failure: the streams flushed,
then ``os._exit``, so that no thread left behind (orbax's writer and signalling threads after a
failed save wait forever for events that never come) keeps the process, and the workdir's lock,
alive.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_cleanups: list[Callable[[], None]] = []  # run, newest first, by exit_now and the handlers
_requested: int | None = None  # the signal number of a pending stop request (inside catch)
_catching = False


def _name(signum: int) -> str:
  return signal.Signals(signum).name


def _run_cleanups() -> None:
  for fn in reversed(list(_cleanups)):
    try:
      fn()
    except Exception:  # noqa: BLE001 (best effort at exit: the process ends anyway)
      pass


def exit_now(code: int) -> None:
  """Runs the registered cleanups, flushes stdout/stderr and ends the process with ``code``
  (``os._exit``: no thread is joined, no interpreter teardown)."""
  _run_cleanups()
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  os._exit(code)  # pylint: disable=protected-access


def _handler(signum: int, frame) -> None:  # pylint: disable=unused-argument
  with contextlib.suppress(Exception):
    sys.stdout.flush()
  with contextlib.suppress(OSError):
    os.write(2, f"interrupted ({_name(signum)}): stopped at once; run the same command "
                "to start again\n".encode())
  exit_now(128 + int(signum))


def install() -> None:
  """SIGINT and SIGTERM end the process at once (one line, exit 130 / 143, cleanups run)."""
  for s in SIGNALS:
    signal.signal(s, _handler)


def exit_code(signum: int) -> int:
  """128 + the signal number: 130 for SIGINT, 143 for SIGTERM (the shell's codes)."""
  return 128 + int(signum)


def requested() -> int | None:
  """The signal number of a pending stop request, or None."""
  return _requested


def _stop_handler(signum: int, frame) -> None:  # pylint: disable=unused-argument
  global _requested  # pylint: disable=global-statement
  if _requested is not None:  # the second one: leave now
    try:
      os.write(2, f"interrupted again ({_name(signum)}): exiting now without saving "
                  "(the last complete checkpoint is kept)\n".encode())
    finally:
      os._exit(exit_code(signum))  # pylint: disable=protected-access
  _requested = signum  # the run's one line comes when it stops (Interrupted)


@contextlib.contextmanager
def catch() -> Iterator[None]:
  """Installs the stop-request handlers of SIGINT and SIGTERM for the ``with`` block (only in
  the main thread; elsewhere a no-op) and restores the previous ones after it."""
  global _requested, _catching  # pylint: disable=global-statement
  if threading.current_thread() is not threading.main_thread() or _catching:
    yield
    return
  previous = {s: signal.getsignal(s) for s in SIGNALS}
  _requested, _catching = None, True
  for s in SIGNALS:
    signal.signal(s, _stop_handler)
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    _requested, _catching = None, False


def interrupted_line(err) -> str:
  """The command line's one line for an :class:`ewc_jax.interrupt.Interrupted`."""
  return f"{err}; run the same command to resume" if err.saved else str(err)


@contextlib.contextmanager
def cleanup(fn: Callable[[], None]) -> Iterator[None]:
  """``fn`` runs if the process ends (:func:`exit_now`, a signal) while the block is open; the
  block's own ``finally`` code does the normal-path cleanup."""
  _cleanups.append(fn)
  try:
    yield
  finally:
    with contextlib.suppress(ValueError):
      _cleanups.remove(fn)


__all__ = ["SIGNALS", "catch", "cleanup", "exit_code", "exit_now", "install", "interrupted_line",
           "requested"]
