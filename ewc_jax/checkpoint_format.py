"""What a run checkpoint holds besides its arrays: its format and version, the checksums of its
arrays and metadata, the configuration it ran with (compared with :func:`config_diff`, fields
added since filled in with the values old checkpoints ran with), and the errors of a checkpoint
that cannot be used."""

from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import errors
from ewc_jax.continual import config as config_lib

PyTree = Any
FORMAT = "ewc_jax.run_state"
VERSION = 2  # 2: checksums of every array and of the metadata (1: none; still restored)


def restart_hint(name: Callable[..., str]) -> str:
  """How to start over, naming the setting with ``name`` (see :class:`errors.SettingError`)."""
  return f"pass {name('force_restart')} to discard the checkpoints and start over"



class CheckpointError(errors.SettingError):
  """A checkpoint that cannot be used: corrupt, truncated, or from another configuration.

  ``message``: text, or ``render(name)`` naming the settings it mentions
  (:class:`ewc_jax.errors.SettingError`: the library spells ``force_restart``, a command line
  ``--force_restart``)."""

  def __init__(self, message: str | Callable[..., str]):
    super().__init__(message if callable(message) else (lambda name: message))


class CorruptCheckpoint(CheckpointError):
  """A checkpoint that cannot be read back as it was written: unreadable, truncated, or its
  arrays or metadata do not match the checksums saved with them (a flipped bit). A restore falls
  back on the previous complete checkpoint; this is raised when none is left. ``detail``: what
  is wrong, without the advice."""

  def __init__(self, detail: str):
    self.detail = detail
    super().__init__(lambda n: f"{detail}; no older complete checkpoint is left to fall back on: "
                     f"{restart_hint(n)}.")


class CheckpointFallback(UserWarning):
  """The newest checkpoint was corrupt: the run resumed from an older one."""


def _crc(data: bytes | memoryview, tag: str) -> str:
  return f"{zlib.crc32(data, zlib.crc32(tag.encode())) & 0xFFFFFFFF:08x}"


def array_checksums(tree: PyTree) -> dict[str, str] | None:
  """``{leaf path: CRC-32 of its dtype, shape and bytes}`` of every array of ``tree`` (None when
  an array is not whole in this process: nothing to check it against here)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return None
    a = np.ascontiguousarray(jax.device_get(leaf))
    out[_path_name(path)] = _crc(a.reshape(-1).view(np.uint8).data,
                                           f"{a.dtype.str}{a.shape}")
  return out


def _path_name(path) -> str:
  """``train_state/opt_state/0/mu/...``: a leaf's path whatever containers hold it (a restored
  named tuple may come back as a dict)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def meta_checksum(meta: dict) -> str:
  """CRC-32 of the metadata (without its ``checksums`` entry) as canonical JSON."""
  body = {k: v for k, v in meta.items() if k != "checksums"}
  return _crc(json.dumps(body, sort_keys=True).encode(), "meta")


def jsonable(obj: Any) -> Any:
  """A JSON round trip: tuples become lists, numpy numbers Python numbers (exact)."""
  return json.loads(json.dumps(obj, default=lambda o: np.asarray(o).tolist()))


# Config fields added after checkpoints were written, with the value those checkpoints ran with.
_ADDED = {"optimizer": "adam", "backbone": "mlp", "width": None, "augment": "none", "init": "flax"}
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(config_lib.Config))


def _fill_added(obj: Any) -> Any:
  """``obj`` with the ``_ADDED`` fields put into every ``Config`` dict nested in it (a sweep's
  per-chunk configs, a command line's base config) that was written before they existed."""
  if isinstance(obj, list):
    return [_fill_added(v) for v in obj]
  if not isinstance(obj, dict):
    return obj
  obj = {k: _fill_added(v) for k, v in obj.items()}
  if _CONFIG_FIELDS - set(_ADDED) <= set(obj):
    obj = {**_ADDED, **obj}
  return obj


def config_diff(saved: dict, current: dict, *, added: dict | None = None) -> list[str]:
  """``"key (checkpoint: a, now: b)"`` for every key whose value differs (JSON-normalised;
  fields added to ``Config`` since the checkpoint count with the value it ran with, and so do
  the caller's identity keys in ``added``: ``{key: the value checkpoints without it ran with}``)."""
  saved, current = _fill_added(jsonable(saved)), jsonable(current)
  added = added or {}
  out = []
  for key in sorted(set(saved) | set(current)):
    a = saved.get(key, _ADDED.get(key, added.get(key, "<absent>")))
    b = current.get(key, "<absent>")
    if a != b:
      out.append(f"{key} (checkpoint: {a!r}, now: {b!r})")
  return out


def host_finite(tree: PyTree) -> bool:
  """Whether every floating-point array of ``tree`` (host values) is finite."""
  return all(bool(np.isfinite(a).all()) for a in jax.tree.leaves(tree)
             if jnp.issubdtype(a.dtype, jnp.inexact))


def verify(meta: dict, state: PyTree) -> None:
  """Raises ``ValueError`` when restored arrays differ from the checksums saved with them
  (checkpoints written before checksums existed: when any array is not finite, which no saved
  state ever was)."""
  sums = (meta.get("checksums") or {}).get("arrays")
  if sums is None:
    if not host_finite(jax.device_get(state)):
      raise ValueError("its arrays are not finite (no checksums to check them against)")
    return
  got = array_checksums(state)
  if got is None:
    return
  bad = sorted(k for k in set(sums) | set(got) if sums.get(k) != got.get(k))
  if bad:
    raise ValueError(f"{len(bad)} array(s) do not match their checksums, e.g. {bad[0]}")


__all__ = ["FORMAT", "VERSION", "CheckpointError", "CheckpointFallback", "CorruptCheckpoint",
           "array_checksums", "config_diff", "host_finite", "jsonable", "meta_checksum",
           "restart_hint", "verify"]
