"""Where a run stands (:class:`RunState`, everything needed to continue it exactly) and what it
returns (:class:`Result`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ewc_jax.continual import step as step_lib

PyTree = Any


class Result(NamedTuple):
  acc_matrix: np.ndarray          # [T, T]: R[i, j] after task i on task j (test sets)
  curves: list[dict[str, list[float]]]  # per task: per-epoch mean of each train metric
  timings: dict[str, float]
  params: PyTree
  memory: PyTree
  val_acc_matrix: np.ndarray | None = None  # [T, T] on the validation split (None: no split)
  model_state: PyTree = None      # the backbone's final model state (e.g. batch_stats; {}: none)
  diverged: dict | None = None    # sweeps: {config index: divergence_record} (their rows: NaN)



class RunState(NamedTuple):
  """Where a run stands: everything needed to continue it exactly (see :func:`run`).

  ``epoch`` equal to the task's number of epochs (:meth:`Config.schedule`) means task ``task``
  is trained but not yet evaluated/consolidated. ``epoch == 0 and step == 0`` means task
  ``task`` starts now (with ``reset_optimizer`` a fresh optimizer is created from
  ``train_state.params``). With a sweep every array has a leading config axis, and
  ``diverged`` maps each config that diverged to its :func:`divergence_record` (it trains on,
  its results are NaN; the other configs are unaffected).
  """
  task: int
  epoch: int
  step: int
  train_state: step_lib.TrainState
  memory: PyTree
  acc: np.ndarray                       # [(K,) T, T]
  curves: list                          # per task: {metric: [per-epoch mean]} (per config)
  epoch_sums: dict                      # running sums of the current epoch's metrics
  val_acc: np.ndarray | None = None     # [(K,) T, T] on the validation split, when held out
  diverged: dict | None = None          # sweeps: {config index: divergence_record(...)}

