"""Stopping a run on request, at a chunk boundary: what is stopped and where.

The library installs no signal handler and keeps no global state: the caller says whether a
stop was requested with ``stop_requested()`` (the signal number of a pending request, or None;
the command lines answer it from their SIGINT / SIGTERM handlers, :mod:`experiments.signals`).
A :class:`ewc_jax.checkpoint.RunCheckpointer` given one saves the position and raises
:class:`Interrupted`; without checkpoints, :func:`stop_hook` is the ``on_checkpoint`` hook that
raises it unsaved.

    >>> hook = stop_hook(lambda: 2)   # a SIGINT pending
    >>> from types import SimpleNamespace
    >>> try:
    ...   hook(SimpleNamespace(task=0, epoch=1, step=32), "chunk")
    ... except Interrupted as err:
    ...   print(err)
    interrupted (SIGINT) at task 1, epoch 2, step 32; not saved (checkpointing is off)
"""

from __future__ import annotations

import signal
import sys
from typing import Callable

StopRequested = Callable[[], "int | None"]  # the signal number of a pending stop, or None


class Interrupted(Exception):
  """A run stopped on request (signal ``signum``) at ``task``, ``epoch``, ``step`` (0-based task
  and epoch; step within the epoch; ``done``: at the end of ``task``); ``saved``: a checkpoint
  of that position was written."""

  def __init__(self, signum: int, *, task: int, epoch: int, step: int, saved: bool,
               done: bool = False):
    self.signum, self.task, self.epoch, self.step = int(signum), task, epoch, step
    self.saved, self.done = saved, done
    where = (f"the end of task {task}" if done else f"task {task + 1}, after epoch {epoch}"
             if step == 0 and epoch > 0 else f"task {task + 1}, epoch {epoch + 1}, step {step}")
    tail = "saved" if saved else "not saved (checkpointing is off)"
    super().__init__(f"interrupted ({signal.Signals(self.signum).name}) at {where}; {tail}")


def raise_if_requested(rs, stop_requested: StopRequested | None, *, saved: bool) -> None:
  """Raises :class:`Interrupted` at the position of the :class:`RunState` ``rs`` when
  ``stop_requested()`` names a signal."""
  signum = stop_requested() if stop_requested is not None else None
  if signum is None:
    return
  sys.stdout.flush()
  if rs.epoch == 0 and rs.step == 0 and rs.task > 0:
    raise Interrupted(signum, task=rs.task, epoch=0, step=0, saved=saved, done=True)
  raise Interrupted(signum, task=rs.task, epoch=rs.epoch, step=rs.step, saved=saved)


def stop_hook(stop_requested: StopRequested) -> Callable:
  """An ``on_checkpoint`` hook for runs without checkpoints: raises :class:`Interrupted` (not
  saved) when ``stop_requested()`` names a signal."""
  def hook(rs, reason: str) -> None:
    del reason
    raise_if_requested(rs, stop_requested, saved=False)
  return hook


__all__ = ["Interrupted", "StopRequested", "raise_if_requested", "stop_hook"]
