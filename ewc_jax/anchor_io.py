"""Anchors on disk: :func:`save_anchors` / :func:`restore_anchors` (orbax, imported on use).

Apart from the run checkpoints (:mod:`ewc_jax.checkpoint`), so that a user of the library's
pure functions imports neither orbax nor the runner.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ewc_jax import orbax_io
from ewc_jax import penalty as penalty_lib
from ewc_jax import validation

ANCHORS_FORMAT = "ewc_jax.anchors"
VERSION = 1


def _anchor_tree(anchors) -> tuple[str, Any]:
  """``("stacked", Anchor)`` or ``("sequence", tuple of Anchor)``, validated."""
  if isinstance(anchors, penalty_lib.Anchor):
    validation.check_same_structure("anchors.importance", anchors.params, anchors.importance,
                                    "anchors.params")
    validation.check_importance("anchors.importance", anchors.importance)
    return "stacked", anchors
  out = penalty_lib.anchor_sequence(anchors)
  for k, a in enumerate(out[1:], start=1):
    validation.check_same_structure(f"anchors[{k}].params", out[0].params, a.params,
                                    "anchors[0].params")
  return "sequence", out


def save_anchors(path: str | os.PathLike, anchors, *, overwrite: bool = False) -> None:
  """Saves a sequence of :class:`~ewc_jax.Anchor` or one stacked Anchor to the folder ``path``.

  Synchronous and atomic (orbax writes a temporary folder, then renames it). Any pytree of
  arrays works (Flax, Haiku, Equinox, dicts); dtypes are kept.

  Raises:
    ValueError: ``path`` exists and ``overwrite`` is False; malformed anchors (names the leaf).
  """
  kind, tree = _anchor_tree(anchors)
  path = Path(path).absolute()
  if path.exists() and not overwrite:
    raise ValueError(f"`path` {str(path)!r} already exists; pass overwrite=True to replace it.")
  ocp = orbax_io.ocp()
  meta = {"format": ANCHORS_FORMAT, "version": VERSION, "kind": kind,
          "count": None if kind == "stacked" else len(tree)}
  args = {"meta": ocp.args.JsonSave(meta)}
  if kind == "stacked" or tree:
    args["anchors"] = ocp.args.StandardSave(tree)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, args=ocp.args.Composite(**args), force=overwrite)


def restore_anchors(path: str | os.PathLike, like=None):
  """Loads what :func:`save_anchors` wrote: a tuple of Anchor, or one stacked Anchor.

  Args:
    path: the folder given to :func:`save_anchors`.
    like: optional anchors (arrays or ``jax.ShapeDtypeStruct``) of the same form: the result
      then has exactly their pytree types and placement. Without it, ``params``/``importance``
      come back as nested dicts and lists of ``jax.Array`` (orbax's generic form).

  Raises:
    ValueError: ``path`` holds no anchors, is corrupt, or does not match ``like``.
  """
  path = Path(path).absolute()
  ocp = orbax_io.ocp()
  if not path.is_dir():
    raise ValueError(f"`path` {str(path)!r} is not a folder written by ewc_jax.save_anchors.")
  with orbax_io.closed_loop_noise_dropped():
    try:
      with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        meta = ckptr.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(meta, dict) or meta.get("format") != ANCHORS_FORMAT:
          raise ValueError("no ewc_jax anchors metadata")
        kind, count = meta["kind"], meta["count"]
        if kind == "sequence" and count == 0:
          target = None
        elif like is None:
          target = ocp.args.StandardRestore()
        else:
          like_kind, like_tree = _like_tree(like)
          if like_kind != kind or (kind == "sequence" and len(like_tree) != count):
            what = "one stacked Anchor" if kind == "stacked" else f"a sequence of {count} anchors"
            got = ("one stacked Anchor" if like_kind == "stacked"
                   else f"a sequence of {len(like_tree)} anchors")
            raise ValueError(f"`like` is {got} but {str(path)!r} holds {what}.")
          target = ocp.args.StandardRestore(like_tree)
        tree = None if target is None else ckptr.restore(
            path, args=ocp.args.Composite(anchors=target)).anchors
    except ValueError as err:
      orbax_io.wait_for_failed_reads(err, str(path))
      raise ValueError(f"cannot restore anchors from {str(path)!r}: {err}") from err
    except Exception as err:  # noqa: BLE001 (tensorstore/orbax/json errors of a damaged folder)
      orbax_io.wait_for_failed_reads(err, str(path))
      raise ValueError(f"cannot restore anchors from {str(path)!r} (corrupt or truncated?): "
                       f"{orbax_io.first_line(err)}") from err
  if tree is None:
    return ()
  if like is not None:
    return tree
  as_anchor = lambda a: penalty_lib.Anchor(params=a["params"], importance=a["importance"])  # noqa: E731
  return as_anchor(tree) if kind == "stacked" else tuple(as_anchor(a) for a in tree)


def _like_tree(like):
  """``like`` in the form it was saved (no importance check: it may hold shapes only)."""
  if isinstance(like, penalty_lib.Anchor):
    return "stacked", like
  if isinstance(like, (list, tuple)):
    return "sequence", tuple(penalty_lib.Anchor(*a) for a in like)
  raise ValueError(f"`like` must be a sequence of Anchor or one stacked Anchor, got "
                   f"{type(like).__name__}.")


__all__ = ["ANCHORS_FORMAT", "restore_anchors", "save_anchors"]
