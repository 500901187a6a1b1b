"""Orbax, imported only when a checkpoint is read or written, and its error noise kept quiet.

Shared by the run checkpoints (:mod:`ewc_jax.checkpoint`) and the anchor files
(:mod:`ewc_jax.anchor_io`): a user error there stays one line.
"""

from __future__ import annotations

import logging
import os
import sys


def ocp():
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp


def ignore_closed_loop_callbacks() -> None:
  """Installed before orbax reads: when it fails on a damaged checkpoint, reads still in flight
  complete on its already closed event loop and Python prints "RuntimeError: Event loop is
  closed" with a traceback (harmless: nothing is written). Drop exactly that message (it goes
  through ``sys.excepthook``/``sys.unraisablehook``) so that a user error stays one line."""
  if getattr(sys.excepthook, "_ewc_jax_filter", False):
    return

  def noise(exc) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

  previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

  def excepthook(exc_type, exc, tb):
    if not noise(exc):
      previous_except(exc_type, exc, tb)

  def unraisablehook(unraisable):
    if not noise(unraisable.exc_value):
      previous_unraisable(unraisable)
  excepthook._ewc_jax_filter = True  # pylint: disable=protected-access
  sys.excepthook, sys.unraisablehook = excepthook, unraisablehook


class _DropOrbaxErrors(logging.Filter):
  """Drops orbax's own error logs (with tracebacks) of a failed background save: the failure
  reaches the caller as one :class:`CheckpointError` anyway."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def quiet_orbax_errors() -> None:
  """Installs :class:`_DropOrbaxErrors` on absl's logger (the command line does, without
  ``--debug``); idempotent."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxErrors) for f in logger.filters):
    logger.addFilter(_DropOrbaxErrors())


def first_line(err: BaseException) -> str:
  text = str(err).strip()
  return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


__all__ = ["first_line", "ignore_closed_loop_callbacks", "ocp", "quiet_orbax_errors"]
