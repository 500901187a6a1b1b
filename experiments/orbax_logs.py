"""The command lines' filter of orbax's error logs: a failed background save is reported as one
line (:class:`ewc_jax.checkpoint.CheckpointError`), not also as orbax's own logged traceback.
A process setting (absl's logger), so the application installs it, not the library."""

from __future__ import annotations

import logging
import os


class _DropOrbaxErrors(logging.Filter):
  """Drops orbax's own error logs (with tracebacks) of a failed background save: the failure
  reaches the caller as one :class:`ewc_jax.checkpoint.CheckpointError` anyway."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def quiet_orbax_errors() -> None:
  """Installs :class:`_DropOrbaxErrors` on absl's logger (the command line does, without
  ``--debug``); idempotent."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropOrbaxErrors) for f in logger.filters):
    logger.addFilter(_DropOrbaxErrors())


__all__ = ["quiet_orbax_errors"]
