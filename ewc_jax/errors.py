"""Errors that name a setting: the library spells it as a field (`lam`), a command line as its
flag (--lam), from the same error.

    >>> from ewc_jax.errors import SettingError
    >>> err = SettingError.invalid("lam", 0.0, "a finite number > 0")
    >>> str(err)
    '`lam`=0.0 is invalid: expected a finite number > 0.'
    >>> err.for_flags()
    '--lam=0.0 is invalid: expected a finite number > 0.'
    >>> off = SettingError(lambda name: f"{name('resume', False)}: the folder holds checkpoints.")
    >>> str(off), off.for_flags()
    ('`resume`=False: the folder holds checkpoints.', '--noresume: the folder holds checkpoints.')
"""

from __future__ import annotations

from typing import Any, Callable

_NO_VALUE = object()


def as_field(field: str, value: Any = _NO_VALUE) -> str:
  """A setting as the library spells it: ``\\`lam\\``` (with a value: ``\\`lam\\`=0.0``)."""
  return f"`{field}`" if value is _NO_VALUE else f"`{field}`={value!r}"


def as_flag(field: str, value: Any = _NO_VALUE) -> str:
  """A setting as a command line spells it: ``--lam`` (``--lam=0.0``; booleans ``--resume`` /
  ``--noresume``)."""
  if value is _NO_VALUE or value is True:
    return f"--{field}"
  return f"--no{field}" if value is False else f"--{field}={value!r}"


class SettingError(ValueError):
  """A bad setting (a :class:`ewc_jax.continual.Config` field or a run argument).

  ``render(name)`` writes the message with ``name(field)`` spelling each setting it mentions
  (``name(field, value)``: the setting with its value): ``str(err)`` uses ``\\`field\\``` and
  ``\\`field\\`=value``, :meth:`for_flags` uses ``--field`` and ``--field=value`` (a boolean:
  ``--field`` / ``--nofield``).
  """

  def __init__(self, render: Callable[..., str]):
    self.render = render
    super().__init__(render(as_field))

  def for_flags(self) -> str:
    return self.render(as_flag)

  @classmethod
  def invalid(cls, field: str, value: Any, allowed: str) -> "SettingError":
    """``<field>=<value> is invalid: expected <allowed>.``"""
    return cls(lambda name: f"{name(field)}={value!r} is invalid: expected {allowed}.")


__all__ = ["SettingError", "as_field", "as_flag"]
