"""absl flags generated from config dataclasses: a setting is declared once, as a field.

Every leaf field of a config (nested dataclasses flattened; an outer field shadows an inner one
of the same name, e.g. a sweep's list ``lam`` over the run's float ``lam``) becomes a flag of
the same name, typed from its annotation (``bool``, ``int``, ``float``, ``str``, a tuple ->
comma-separated list), with the field's ``metadata["help"]``. Every generated flag defaults to
None, meaning "not given": :func:`read` returns only the given ones, and
:func:`experiments.config.make` fills the rest (the benchmark's defaults, then the fields').

    >>> import dataclasses
    >>> from absl import flags
    >>> from experiments import config_flags
    >>> @dataclasses.dataclass(frozen=True)
    ... class Demo:
    ...   rate: float = dataclasses.field(default=0.1, metadata={"help": "A rate."})
    ...   widths: tuple[int, ...] = (4,)
    >>> values = flags.FlagValues()
    >>> config_flags.define(Demo, flag_values=values)
    >>> _ = values(["prog", "--widths=8,16"])
    >>> config_flags.read(Demo, flag_values=values)
    {'widths': (8, 16)}
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Iterator

from absl import flags

from ewc_jax import errors


def leaves(cls: type) -> Iterator[tuple[dataclasses.Field, Any]]:
  """``(field, type)`` of every leaf field of ``cls`` (nested dataclasses flattened, outer
  names first and shadowing inner ones)."""
  seen: set[str] = set()
  nested = []
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    kind = hints[f.name]
    if dataclasses.is_dataclass(kind):
      nested.append(kind)
    elif f.name not in seen:
      seen.add(f.name)
      yield f, kind
  for inner in nested:
    for f, kind in leaves(inner):
      if f.name not in seen:
        seen.add(f.name)
        yield f, kind


def _base(kind: Any) -> Any:
  """``X`` of ``X | None``."""
  if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if len(args) == 1:
      return args[0]
  return kind


def _default_text(name: str, default: Any, per_benchmark: frozenset[str]) -> str:
  if name in per_benchmark:
    return (" Default: per benchmark and scenario (docs/cli.md, 'Defaults and how they "
            "were chosen').")
  if default is None or default is dataclasses.MISSING:
    return ""
  if isinstance(default, tuple):
    return f" Default: {','.join(map(str, default))}." if default else ""
  if isinstance(default, bool):
    return f" Default: {'true' if default else 'false'}."
  return f" Default: {default:g}." if isinstance(default, float) else f" Default: {default}."


def define(cls: type, *, skip: tuple[str, ...] = (), defaults: dict | None = None,
           per_benchmark: frozenset[str] = frozenset(),
           flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one flag per leaf field of ``cls`` (except ``skip``). ``defaults`` overrides the
  default shown in a field's help (the value itself is filled by the config's builder);
  ``per_benchmark``: fields whose default depends on the benchmark and scenario."""
  shown = defaults or {}
  for f, kind in leaves(cls):
    if f.name in skip:
      continue
    default = shown.get(f.name, f.default)
    help_text = f.metadata.get("help", f.name) + _default_text(f.name, default, per_benchmark)
    kind = _base(kind)
    origin = typing.get_origin(kind) or kind
    if origin is tuple or origin is list:
      flags.DEFINE_list(f.name, None, help_text, flag_values=flag_values)
    elif kind is bool:
      flags.DEFINE_bool(f.name, None, help_text, flag_values=flag_values)
    elif kind is int:
      flags.DEFINE_integer(f.name, None, help_text, flag_values=flag_values)
    elif kind is float:
      flags.DEFINE_float(f.name, None, help_text, flag_values=flag_values)
    elif kind is str:
      flags.DEFINE_string(f.name, None, help_text, flag_values=flag_values)
    else:
      raise TypeError(f"{cls.__name__}.{f.name}: no flag type for {kind!r}.")


def _parse_list(name: str, raw: list[str], item: type) -> tuple:
  try:
    return tuple(item(v) for v in raw)
  except (TypeError, ValueError) as err:
    what = "integers" if item is int else "numbers"
    text = ",".join(map(str, raw))
    raise errors.SettingError(lambda n: f"{n(name)}={text} is invalid: expected {what} "
                              "separated by commas.") from err


def read(cls: type, *, skip: tuple[str, ...] = (),
         flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
  """``{field: value}`` of the flags given on the command line (lists parsed to tuples of the
  field's item type: a bad item or an empty list raises :class:`ewc_jax.errors.SettingError`)."""
  out = {}
  for f, kind in leaves(cls):
    if f.name in skip or flag_values[f.name].value is None:
      continue
    value = flag_values[f.name].value
    kind = _base(kind)
    if (typing.get_origin(kind) or kind) is tuple:
      if not value:  # "--seeds=": refused, not read as "no value" (the default)
        raise errors.SettingError(lambda n, name=f.name: f"{n(name)}= is invalid: expected at "
                                  "least one value (a comma-separated list).")
      item = (typing.get_args(kind) or (str,))[0]
      value = _parse_list(f.name, value, item)
    out[f.name] = value
  return out
