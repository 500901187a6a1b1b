"""Signals and the process's end, from its first line to its last (standard library only).

A command line calls :func:`install` first thing, before its heavy imports (JAX, TFDS, orbax:
seconds, more under load): from then on SIGINT (Ctrl-C) and SIGTERM end the process at once,
with one line on stderr and status 130 / 143, whatever it is doing (importing, parsing,
compiling). Nothing is half-written then: the outputs are written atomically, and the
workdir's lock file and a workdir this process created and left empty are removed (the
:func:`cleanup` callbacks registered by :mod:`experiments.lock` and :mod:`experiments.files`).
Once training starts, :func:`ewc_jax.interrupt.catch` takes over (a stop requested at the next
chunk boundary, saved) and gives these handlers back when training ends.

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
from typing import Callable, Iterator

_cleanups: list[Callable[[], None]] = []  # run, newest first, by exit_now and the handlers


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
  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, _handler)


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


__all__ = ["cleanup", "exit_now", "install"]
