"""Checkpoints with orbax: a continual run's whole state, and anchors on their own.

Two things are persisted here:

* :class:`RunCheckpointer`, the ``on_checkpoint`` hook of :func:`ewc_jax.continual.run`: it saves
  the :class:`~ewc_jax.continual.RunState` (position task/epoch/step, parameters, optimizer
  state and model state (BatchNorm's running averages: an item ``model_state`` beside
  ``train_state``, written only when the backbone has one), the algorithm's memory = anchors,
  the accuracy matrix so far, the curves, the current epoch's partial sums) with the run's
  configuration, after every task and every ``every`` train
  steps, keeping the newest ``keep``; :meth:`RunCheckpointer.restore` gives it back for
  ``run(..., resume=...)``. Array leaves go through orbax's ``StandardSave``; the host-side
  numbers (float64 accuracy matrix, curves, partial sums) through ``JsonSave``, whose shortest
  round-trip float repr restores them bit for bit.
* anchors on their own, for users of :func:`ewc_jax.ewc_loss`: :func:`ewc_jax.save_anchors` /
  :func:`ewc_jax.restore_anchors` (:mod:`ewc_jax.anchor_io`).

Saves are atomic: orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to
``<step>`` once complete, so a process killed mid-save leaves the previous checkpoint as the
newest one (the temporary folder is ignored, then removed by the next run). Run checkpoints are
written in the background by default (``async_save=True``): :meth:`RunCheckpointer.save` copies
the arrays (a host copy, or a device-side one for sharded arrays: the caller may donate or
overwrite its buffers right away) and
returns while orbax writes them; the next save, :meth:`RunCheckpointer.wait` and
:meth:`RunCheckpointer.close` wait for it. Training of the next task overlaps the write.

orbax is imported lazily (``import ewc_jax`` does not load it).
:meth:`RunCheckpointer.prefetch` imports it on a background thread (the command line starts it
when training starts, so the first save does not wait for the import).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import continual
from ewc_jax import errors
from ewc_jax import orbax_io
from ewc_jax import interrupt
from ewc_jax.continual import step as step_lib
from ewc_jax.checkpoint_format import (FORMAT, VERSION, CheckpointError, CheckpointFallback,
                                       CorruptCheckpoint, array_checksums, config_diff,
                                       host_finite, jsonable, meta_checksum, restart_hint, verify)

PyTree = Any
def _on_disk(train_state: step_lib.TrainState, memory: PyTree) -> dict:
  """The saved layout: ``train_state`` as ``{params, opt_state}`` (as before model state existed)
  and ``model_state`` as an item of its own, present only when it holds arrays."""
  out = {"train_state": {"params": train_state.params, "opt_state": train_state.opt_state},
         "memory": memory}
  if jax.tree.leaves(train_state.model_state):
    out["model_state"] = train_state.model_state
  return out


def _from_disk(state: dict, model_state_like: PyTree) -> step_lib.TrainState:
  ts = state["train_state"]
  return step_lib.TrainState(ts["params"], ts["opt_state"],
                              state.get("model_state", model_state_like))


@jax.jit
def _snapshot(params: PyTree, arrays: PyTree) -> tuple[PyTree, jax.Array, jax.Array]:
  """A device-side copy of ``arrays`` (safe from later donation) and whether ``params`` and
  ``arrays`` are finite: one compiled call instead of a dispatch per leaf."""
  return (jax.tree.map(jnp.copy, arrays), step_lib.all_finite(params),
          step_lib.all_finite(arrays))


def _whole_here(tree: PyTree) -> bool:
  """Whether every leaf is a ``jax.Array`` on one device of this process."""
  return all(isinstance(a, jax.Array) and a.is_fully_addressable
             and len(a.sharding.device_set) == 1 for a in jax.tree.leaves(tree))


def _saved_copy(params: PyTree, arrays: PyTree) -> tuple[PyTree, bool, bool]:
  """A copy of ``arrays`` safe from later donation, and whether ``params`` and ``arrays`` are
  finite. When every array lives whole in this process: NumPy copies checked on the host
  (orbax then writes them without its per-``jax.Array`` sharding machinery, about a fifth
  less CPU per save, and nothing is compiled); else device copies (:func:`_snapshot`)."""
  if _whole_here(arrays):
    host = jax.device_get(arrays)
    ok = host_finite(host)
    return host, (ok or host_finite(jax.device_get(params))), ok
  copy, params_ok, all_ok = _snapshot(params, arrays)
  return copy, bool(params_ok), bool(all_ok)


def _num_configs(tree: PyTree) -> int:
  return int(np.shape(jax.tree.leaves(tree)[0])[0])


def _rows(tree: PyTree, rows: np.ndarray) -> PyTree:
  """The configs ``rows`` (a boolean mask of the leading axis) of every array of ``tree``."""
  return jax.tree.map(lambda a: np.asarray(a)[rows], tree)


def _non_finite_part(rs: continual.RunState) -> str:
  """Which part of a run state whose parameters are finite is not: its name in messages."""
  parts = (("optimizer state", rs.train_state.opt_state),
           ("model state", rs.train_state.model_state), ("importance/memory", rs.memory))
  for name, tree in parts:
    if not host_finite(jax.device_get(tree)):
      return name
  return "importance/memory"


class RunCheckpointer:
  """Saves and restores a continual run under ``directory`` with an orbax ``CheckpointManager``.

  Use it as ``continual.run(..., on_checkpoint=ckpt, resume=ckpt.restore(like))``. Step numbers
  are consecutive save indices. Every checkpoint carries ``config`` (a JSON-able dict): restoring
  under another configuration raises :class:`CheckpointError` naming the differing keys.

  Args:
    directory: the checkpoint folder (created at the first save, not before).
    config: what identifies the run (flags, dataset, seed...).
    keep: how many of the newest checkpoints to keep (>= 1).
    every: also save within a task once at least ``every`` train steps were done since the last
      save (counted in whole chunks of ``chunk_steps``); 0: only after each task.
    chunk_steps: the runner's ``Config.chunk_steps`` (steps between two ``"chunk"`` calls).
    async_save: write in the background (see the module docstring); False: each
      :meth:`save` returns once its checkpoint is committed.
    warn: called with one line when :meth:`restore` skips a corrupt checkpoint for an older
      one (default: ``warnings.warn`` with :class:`CheckpointFallback`).
    added: keys of ``config`` that the caller added since checkpoints were written, with the
      value those checkpoints ran with (their absence then counts as that value).

  Integrity: every checkpoint carries a CRC-32 of each array (dtype, shape, bytes) and of its
  metadata; :meth:`restore` verifies them, and a checkpoint that does not match (or cannot be
  read) is skipped for the previous complete one, or refused with :class:`CorruptCheckpoint`
  when none is left: a damaged checkpoint is never restored.
  """

  def __init__(self, directory: str | os.PathLike, config: dict, *, keep: int = 2,
               every: int = 0, chunk_steps: int = continual.Config.chunk_steps,
               async_save: bool = True, warn: Callable[[str], Any] | None = None,
               stop_requested: interrupt.StopRequested | None = None,
               added: dict | None = None):
    if not isinstance(keep, (int, np.integer)) or keep < 1:
      raise errors.SettingError.invalid("keep", keep, "an integer >= 1")
    if not isinstance(every, (int, np.integer)) or every < 0:
      raise errors.SettingError.invalid("checkpoint_every", every, "an integer >= 0")
    self.directory = Path(directory).absolute()
    self.config = jsonable(config)
    self.added = dict(added or {})
    self.keep, self.every, self.chunk_steps = int(keep), int(every), int(chunk_steps)
    self.async_save = bool(async_save)
    self.stop_requested = stop_requested
    self._manager = None
    self._next_step: int | None = None
    self._since = 0
    self._prefetch = None
    self._pending: int | None = None  # the step of a save that may still be in flight
    self._quiet = contextlib.ExitStack()  # the closed-loop filter's scope, open with _manager
    self.warn = warn or (lambda line: warnings.warn(line, CheckpointFallback, stacklevel=3))
    self.restored_step: int | None = None  # the step restore() gave back (after any fallback)
    self.saved_steps: list[int] = []
    self.save_seconds = 0.0  # wall time the caller waited for saves (blocking part and waits)

  # -- orbax plumbing
  def prefetch(self) -> None:
    """Imports orbax on a background thread (idempotent); the first save then need not."""
    if self._prefetch is None and "orbax.checkpoint" not in sys.modules:
      self._prefetch = threading.Thread(target=orbax_io.ocp, name="ewc_jax-orbax-import", daemon=True)
      self._prefetch.start()

  def _mgr(self):
    if self._manager is None:
      ocp = orbax_io.ocp()
      _remove_unfinished(self.directory)
      # Not orbax's own cleanup: with async checkpointing it runs on a background thread, and
      # two managers of one folder (a config check, then the run's) race deleting one folder.
      options = ocp.CheckpointManagerOptions(
          max_to_keep=self.keep, create=True, enable_async_checkpointing=self.async_save,
          cleanup_tmp_directories=False)
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("state", "meta"))
      self._quiet.enter_context(orbax_io.closed_loop_noise_dropped())
    return self._manager

  def wait(self) -> None:
    """Blocks until every checkpoint saved so far is committed (renamed into place).

    Raises :class:`CheckpointError` (one line) when a background save failed."""
    if self._manager is not None:
      t0 = time.perf_counter()
      try:
        self._manager.wait_until_finished()
      except Exception as err:  # noqa: BLE001 (tensorstore/OS errors of the background write)
        raise self._save_failed(self._pending, err) from err
      finally:
        self.save_seconds += time.perf_counter() - t0
      self._pending = None

  def close(self) -> None:
    """Waits for the last save (raising its :class:`CheckpointError` if it failed), closes the
    orbax manager and puts the process's ``sys.unraisablehook`` back as it was before."""
    if self._manager is not None:
      try:
        self.wait()
      finally:
        manager, self._manager = self._manager, None
        with contextlib.suppress(Exception):  # a failed save was reported by wait()
          manager.close()
        self._quiet.close()

  def _save_failed(self, step: int | None, err: BaseException) -> CheckpointError:
    """The one-line error of a save that failed (disk full, folder made read-only...), once the
    failed writes' late messages settled."""
    orbax_io.wait_for_failed_reads(err, str(self.directory))
    what = f"checkpoint {self.step_path(step)}" if step is not None else "a checkpoint"
    good = committed_steps(self.directory)
    kept = (f"the last complete checkpoint {self.step_path(good[-1])} is kept"
            if good else "no complete checkpoint was written")
    return CheckpointError(f"could not save {what} ({orbax_io.first_line(err)}); {kept}. Make "
                           f"{self.directory} writable (or free space) and run the same "
                           "command again to resume.")

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (temporary, unfinished ones are ignored), or None."""
    if not self.directory.is_dir():
      return None
    return self._mgr().latest_step()

  def step_path(self, step: int) -> Path:
    return self.directory / str(step)

  def _corrupt(self, step: int, err: BaseException) -> CheckpointError:
    """The one-line error of an unreadable checkpoint (once orbax's failed reads settled)."""
    orbax_io.wait_for_failed_reads(err, str(self.step_path(step)))
    return CorruptCheckpoint(f"checkpoint {self.step_path(step)} is corrupt or truncated "
                             f"({orbax_io.first_line(err)})")

  def read_meta(self, step: int | None = None) -> dict:
    """The JSON part of a checkpoint (position, accuracy matrix, curves, config)."""
    step = self.latest_step() if step is None else step
    ocp = orbax_io.ocp()
    try:
      meta = self._mgr().restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as err:  # orbax/tensorstore/json raise many types: all mean unreadable
      raise self._corrupt(step, err) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
      raise self._corrupt(step, ValueError(f"not an {FORMAT} checkpoint"))
    sums = meta.get("checksums")
    if sums is not None and (not isinstance(sums, dict) or sums.get("meta") != meta_checksum(meta)):
      raise self._corrupt(step, ValueError("its metadata do not match their checksum"))
    return meta

  def _readable_steps(self) -> list[int]:
    """The complete checkpoints, newest first."""
    if not self.directory.is_dir():
      return []
    return sorted(self._mgr().all_steps(), reverse=True)

  def check_config(self, step: int | None = None) -> None:
    """Raises :class:`CheckpointError` when the checkpoint (default: the newest whose metadata
    are intact) was written by another config, :class:`CorruptCheckpoint` when none is."""
    if step is None:
      steps = self._readable_steps()
      if not steps:
        return
      first_error = None
      for candidate in steps:
        try:
          meta = self.read_meta(candidate)
        except CorruptCheckpoint as err:
          first_error = first_error or err
          continue
        step = candidate
        break
      else:
        raise first_error
    else:
      meta = self.read_meta(step)
    diff = config_diff(meta["config"], self.config, added=self.added)
    if diff:
      text = (f"checkpoint {self.step_path(step)} was written by a different configuration: "
              + "; ".join(diff))
      raise CheckpointError(lambda n: f"{text}. Use the same settings to resume, or "
                            f"{restart_hint(n)}.")

  # -- restore / save
  def restore(self, like: dict | Callable[[], dict],
              step: int | None = None) -> continual.RunState | None:
    """The :class:`RunState` of the newest (or given) checkpoint, or None when there is none.

    ``like``: :func:`abstract_run_state` (shapes, dtypes, placement of the arrays), or a
    function of no argument returning it, called only when there is a checkpoint to restore.
    Without ``step``, a corrupt checkpoint (unreadable, or not matching its checksums) is
    skipped for the previous one with one ``warn`` line; :class:`CorruptCheckpoint` when none
    is left. :attr:`restored_step` is the step given back.
    """
    steps = self._readable_steps() if step is None else [step]
    if not steps:
      return None
    like = like() if callable(like) else like
    first_error = None
    for i, candidate in enumerate(steps):
      try:
        rs = self._restore_step(candidate, like)
      except CorruptCheckpoint as err:
        if step is not None:
          raise
        first_error = first_error or err
        older = steps[i + 1] if i + 1 < len(steps) else None
        if older is not None:
          self.warn(f"{err.detail}; falling back on the previous one, {self.step_path(older)}")
        continue
      self.restored_step = candidate
      return rs
    raise first_error

  def _restore_step(self, step: int, like: dict) -> continual.RunState:
    self.check_config(step)
    ocp = orbax_io.ocp()
    try:
      out = self._mgr().restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_on_disk(like["train_state"], like["memory"])),
          meta=ocp.args.JsonRestore()))
      meta, state = out.meta, out.state
      verify(meta, state)
      rs = continual.RunState(
          task=int(meta["task"]), epoch=int(meta["epoch"]), step=int(meta["step"]),
          train_state=_from_disk(state, like["train_state"].model_state), memory=state["memory"],
          acc=np.asarray(meta["acc"], np.float64), curves=meta["curves"],
          epoch_sums={k: np.asarray(v, np.float64) for k, v in meta["epoch_sums"].items()},
          val_acc=(None if meta.get("val_acc") is None else
                   np.asarray(meta["val_acc"], np.float64)),
          diverged=(None if meta.get("diverged") is None else
                    {int(k): v for k, v in meta["diverged"].items()}))
    except CheckpointError:
      raise
    except Exception as err:  # noqa: BLE001 (truncated array files, missing items, bad JSON)
      raise self._corrupt(step, err) from err
    if jax.tree.structure(rs.train_state) != jax.tree.structure(like["train_state"]):
      raise self._corrupt(step, ValueError("unexpected train state structure"))
    return rs

  def save(self, rs: continual.RunState, reason: str) -> int:
    """Writes ``rs`` as the next checkpoint (atomic; in the background when ``async_save``)
    and returns its step."""
    t0 = time.perf_counter()
    arrays, params_ok, all_ok = _saved_copy(rs.train_state.params,
                                            _on_disk(rs.train_state, rs.memory))
    if not all_ok and rs.diverged:  # a sweep: its diverged configs are NaN, the others must not
      healthy = np.array([k not in rs.diverged for k in range(_num_configs(arrays))])
      params_ok = host_finite(_rows(jax.device_get(rs.train_state.params), healthy))
      all_ok = host_finite(_rows(jax.device_get(arrays), healthy))
    if not all_ok:
      what = "parameters" if not params_ok else _non_finite_part(rs)
      task = rs.task - 1 if reason == "task" else rs.task
      where = (f"after task {task + 1}" if reason == "task" else
               f"at task {task + 1}, epoch {rs.epoch + 1}, step {rs.step}")
      text = (f"the {what} are not finite {where}; stopped before saving that state (the last "
              "good checkpoint is kept)")
      raise continual.NumericalError(
          lambda n: f"{text}. Try a smaller {n('lr')} or {n('lam')}.",
          task=task, epoch=rs.epoch, step=rs.step, task_step=rs.step, part=what,
          value=float("nan"))
    ocp = orbax_io.ocp()
    mgr = self._mgr()
    if self._next_step is None:
      latest = mgr.latest_step()
      self._next_step = 0 if latest is None else latest + 1
    step = self._next_step
    meta = {"format": FORMAT, "version": VERSION, "reason": reason, "task": int(rs.task),
            "epoch": int(rs.epoch), "step": int(rs.step),
            "acc": np.asarray(rs.acc, np.float64).tolist(), "curves": rs.curves,
            "val_acc": (None if rs.val_acc is None else
                        np.asarray(rs.val_acc, np.float64).tolist()),
            "epoch_sums": {k: np.asarray(v, np.float64).tolist()
                           for k, v in rs.epoch_sums.items()},
            "config": self.config}
    if rs.diverged is not None:
      meta["diverged"] = {str(k): v for k, v in rs.diverged.items()}
    meta = jsonable(meta)
    meta["checksums"] = {"arrays": array_checksums(arrays), "meta": meta_checksum(meta)}
    # ``arrays`` are copies: the caller may donate its buffers to the next step while orbax
    # still writes them in the background.
    previous = self._pending
    try:
      mgr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
               force=True)
    except Exception as err:  # noqa: BLE001 (this save, or the previous background one, failed)
      failed = previous if previous is not None and not self.step_path(previous).is_dir() \
          else step
      raise self._save_failed(failed, err) from err
    self._pending = step
    if not self.async_save:
      self.wait()  # also covers any background finalisation
    self._next_step = step + 1
    self.saved_steps.append(step)
    self.save_seconds += time.perf_counter() - t0
    return step

  def __call__(self, rs: continual.RunState, reason: str) -> None:
    """The ``on_checkpoint`` hook: saves after each task and every ``every`` steps."""
    self.prefetch()
    saved = False
    if reason == "task":
      self.save(rs, reason)
      self._since, saved = 0, True
    elif self.every > 0:
      self._since += self.chunk_steps
      if self._since >= self.every:
        self.save(rs, reason)
        self._since, saved = 0, True
    if self.stop_requested is not None and self.stop_requested() is not None:
      if not saved:  # a stop requested: save this position, then stop
        self.save(rs, "interrupt")
      self.wait()
      interrupt.raise_if_requested(rs, self.stop_requested, saved=True)


class SweepCheckpointer:
  """Checkpoints of a sweep (:func:`ewc_jax.continual.sweep.run`): the whole batched run state of every
  config (a leading config axis; on a mesh, each device's shard) saved like a single run's.

  Each chunk of the sweep (``max_parallel``) is one :class:`RunCheckpointer` under
  ``directory/chunk_<i>``; its identity is ``config`` (what the caller puts there: the swept
  grid and the shared flags) plus the layout (chunks, mesh shape) and the configs of the chunk,
  so a changed grid, flag, ``--max_parallel`` or device count is refused naming the keys.
  Finished chunks keep their final state: a resumed sweep restores it instead of training.
  A sweep that trains its first task once per group (:func:`ewc_jax.continual.sweep.run`) saves
  that part under ``directory/first_task_<i>`` (:meth:`for_first_task`) the same way.

  Args:
    directory: the sweep's checkpoint folder.
    config, keep, every, chunk_steps, async_save, warn, added: as for :class:`RunCheckpointer`.
    log: called with one line when a chunk resumes from a checkpoint (e.g. ``print``).
  """

  def __init__(self, directory: str | os.PathLike, config: dict, *, keep: int = 2,
               every: int = 0, chunk_steps: int = continual.Config.chunk_steps,
               async_save: bool = True, log: Callable[[str], Any] | None = None,
               warn: Callable[[str], Any] | None = None,
               stop_requested: interrupt.StopRequested | None = None,
               added: dict | None = None):
    self.directory = Path(directory).absolute()
    self.config = jsonable(config)
    self.kwargs = {"keep": keep, "every": every, "chunk_steps": chunk_steps,
                   "async_save": async_save, "warn": warn, "stop_requested": stop_requested,
                   "added": added}
    RunCheckpointer(self.directory, {}, **self.kwargs)  # checks keep/every now
    self.log = log

  def folder(self, index: int) -> Path:
    return self.directory / f"chunk_{index}"

  def for_chunk(self, index: int, identity: dict) -> RunCheckpointer:
    """The checkpointer of chunk ``index`` (``identity``: what else identifies that chunk)."""
    return RunCheckpointer(self.folder(index), {**self.config, **identity, "chunk": index},
                           **self.kwargs)

  def for_first_task(self, index: int, identity: dict) -> RunCheckpointer:
    """The checkpointer of chunk ``index`` of the shared first task (the groups'
    representatives, ``directory/first_task_<i>``; see :func:`ewc_jax.continual.sweep.run`)."""
    return RunCheckpointer(self.directory / f"first_task_{index}",
                           {**self.config, **identity, "first_task_chunk": index}, **self.kwargs)


def committed_steps(directory: str | os.PathLike) -> list[int]:
  """The complete (renamed into place) step folders of a checkpoint folder, oldest first."""
  directory = Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _remove_unfinished(directory: Path) -> None:
  """Deletes the step folders a killed process left uncommitted (``*.orbax-checkpoint-tmp*``),
  synchronously, before a manager of ``directory`` is created."""
  if directory.is_dir():
    for path in directory.glob("*.orbax-checkpoint-tmp*"):
      shutil.rmtree(path, ignore_errors=True)


__all__ = ["CheckpointError", "CheckpointFallback", "CorruptCheckpoint", "FORMAT",
           "RunCheckpointer", "SweepCheckpointer", "VERSION", "array_checksums",
           "committed_steps", "config_diff", "meta_checksum"]
