"""Errors that name a setting: the library spells it as a field (`lam`), a command line as its
flag (--lam), from the same error.

    >>> from ewc_jax.errors import SettingError
    >>> err = SettingError.invalid("lam", 0.0, "a finite number > 0")
    >>> str(err)
    '`lam`=0.0 is invalid: expected a finite number > 0.'
    >>> err.for_flags()
    '--lam=0.0 is invalid: expected a finite number > 0.'
"""

from __future__ import annotations

from typing import Any, Callable


class SettingError(ValueError):
  """A bad setting (a :class:`ewc_jax.continual.Config` field or a run argument).

  ``render(name)`` writes the message with ``name(field)`` spelling each setting it mentions:
  ``str(err)`` uses ``\\`field\\```, :meth:`for_flags` uses ``--field``.
  """

  def __init__(self, render: Callable[[Callable[[str], str]], str]):
    self.render = render
    super().__init__(render(lambda field: f"`{field}`"))

  def for_flags(self) -> str:
    return self.render(lambda field: f"--{field}")

  @classmethod
  def invalid(cls, field: str, value: Any, allowed: str) -> "SettingError":
    """``<field>=<value> is invalid: expected <allowed>.``"""
    return cls(lambda name: f"{name(field)}={value!r} is invalid: expected {allowed}.")


__all__ = ["SettingError"]
