"""Where a run stands (:class:`RunState`, everything needed to continue it exactly; its shapes
before it exists, :func:`abstract_run_state`, the target of a restore) and what it returns
(:class:`Result`)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import heads
from ewc_jax.continual import config as config_lib
from ewc_jax.continual import holdout
from ewc_jax.continual import programs as programs_lib
from ewc_jax.continual import step as step_lib
from ewc_jax.continual import task_data

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
  state: "RunState | None" = None  # where the run stopped (see ``continual.run``'s until_task)



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



def abstract_run_state(cfg: config_lib.Config, net: heads.Network,
                       train: task_data.TaskData, *,
                       preprocess: Callable = step_lib.scale_pixels,
                       num_configs: int | None = None, dynamic_p: bool = False,
                       sharding: jax.sharding.Sharding | None = None) -> dict:
  """Shapes, dtypes and placement of ``{"train_state", "memory"}`` as :func:`continual.run`
  creates them (the restore target; nothing is computed).

  ``num_configs``: a sweep's batched state (a leading config axis of that size, as
  ``continual.run(..., seeds=...)`` creates it, with ``dynamic_p`` as there); ``sharding``:
  where each array lives (a sweep's config sharding on its mesh; default the first device).
  """
  progs = programs_lib.programs(cfg, net, config_lib.make_algorithm(cfg, dynamic_p), train,
                                preprocess)

  def init(key, lr):
    return dict(zip(("train_state", "memory"), programs_lib.fresh_state(progs, key, lr)))

  if num_configs is None:
    shapes = jax.eval_shape(init, jax.random.key(0), np.float32(cfg.lr))
  else:
    keys = jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.zeros(num_configs, jnp.int32)))
    lrs = jax.ShapeDtypeStruct((num_configs,), jnp.float32)
    shapes = jax.eval_shape(jax.vmap(init), keys, lrs)
  place = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=place), shapes)


def describe_position(rs: RunState, cfg: config_lib.Config, counts) -> str:
  """Where a restored run stands, for the "resuming from" line (``counts``: each task's
  number of training examples before the validation split is held out)."""
  if rs.task >= len(counts):
    return "all tasks done"
  count = int(counts[rs.task])
  if rs.epoch >= cfg.schedule(count - holdout.num_held_out(count, cfg.validation_fraction))[0]:
    return f"task {rs.task + 1} trained, evaluation and consolidation next"
  return f"task {rs.task + 1}, epoch {rs.epoch + 1}, step {rs.step}"
