"""Clean interrupts: SIGINT / SIGTERM stop a run at the next chunk boundary, saved.

    with interrupt.catch():            # installs the handlers (main thread), restores them after
      continual.run(..., on_checkpoint=ckpt)   # a RunCheckpointer: it checks the request

The first SIGINT (Ctrl-C) or SIGTERM (what cluster schedulers send before preempting) only
*requests* a stop: the run goes on to the end of the current train chunk (``chunk_steps``
steps) or task, where the ``on_checkpoint`` hook (:class:`ewc_jax.checkpoint.RunCheckpointer`,
or :func:`check` without checkpoints) saves the position and raises :class:`Interrupted`. The
command line prints one line and exits 130 (SIGINT) or 143 (SIGTERM), the shell's codes of a
process ended by that signal. A second SIGINT or SIGTERM while the first is pending ends the
process at once (exit 130 / 143, nothing more saved; checkpoints are atomic, so the last
complete one stays the newest).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: int | None = None  # the signal number of a pending stop request
_installed = False


def exit_code(signum: int) -> int:
  """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
  return 128 + int(signum)


def _name(signum: int) -> str:
  return signal.Signals(signum).name


class Interrupted(Exception):
  """A run stopped on request at ``task``, ``epoch``, ``step`` (0-based task and epoch; step
  within the epoch); ``saved``: a checkpoint of that position was written."""

  def __init__(self, signum: int, *, task: int, epoch: int, step: int, saved: bool,
               done: bool = False):
    self.signum, self.task, self.epoch, self.step = int(signum), task, epoch, step
    self.saved, self.done = saved, done
    where = (f"the end of task {task}" if done else f"task {task + 1}, after epoch {epoch}"
             if step == 0 and epoch > 0 else f"task {task + 1}, epoch {epoch + 1}, step {step}")
    tail = ("saved; run the same command to resume" if saved
            else "not saved (checkpointing is off)")
    super().__init__(f"interrupted ({_name(signum)}) at {where}; {tail}")

  @property
  def exit_code(self) -> int:
    return exit_code(self.signum)


def requested() -> int | None:
  """The signal number of a pending stop request, or None."""
  return _requested


def _handler(signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
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
  global _requested, _installed  # pylint: disable=global-statement
  if threading.current_thread() is not threading.main_thread() or _installed:
    yield
    return
  previous = {s: signal.getsignal(s) for s in SIGNALS}
  _requested, _installed = None, True
  for s in SIGNALS:
    signal.signal(s, _handler)
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    _requested, _installed = None, False


def check(rs, reason: str) -> None:  # pylint: disable=unused-argument
  """An ``on_checkpoint`` hook for runs without checkpoints: raises :class:`Interrupted`
  (not saved) when a stop was requested."""
  raise_if_requested(rs, saved=False)


def raise_if_requested(rs, *, saved: bool) -> None:
  """Raises :class:`Interrupted` at the position of the :class:`RunState` ``rs``."""
  signum = _requested
  if signum is None:
    return
  sys.stdout.flush()
  if rs.epoch == 0 and rs.step == 0 and rs.task > 0:
    raise Interrupted(signum, task=rs.task, epoch=0, step=0, saved=saved, done=True)
  raise Interrupted(signum, task=rs.task, epoch=rs.epoch, step=rs.step, saved=saved)


__all__ = ["Interrupted", "catch", "check", "exit_code", "raise_if_requested", "requested"]
