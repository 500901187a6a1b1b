"""The host loop of a run: :func:`run` trains task after task, chunk by chunk, evaluates and
consolidates, with the compiled programs of :mod:`ewc_jax.continual.programs`."""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import algorithms
from ewc_jax import heads
from ewc_jax.continual import holdout
from ewc_jax.continual import step as step_lib
from ewc_jax.continual import task_data
from ewc_jax.continual.config import Config, hyper_of, make_algorithm
from ewc_jax.continual.finite import (NumericalError, check_finite, divergence_record,
                                      new_divergences)
from ewc_jax.continual.programs import (Compiled, Compiler, ConsolidateInputs, compile_programs,
                                        fresh_state, i32, seed_keys, seed_uint32, sweep_jit)
from ewc_jax.continual.state import Result, RunState


def run(cfg: Config, net: heads.Network, train: task_data.TaskData, test: task_data.TaskData,
        *, preprocess: Callable = step_lib.scale_pixels,
        progress: Callable[[int, int], Any] | None = None,
        hyper: algorithms.Hyper | None = None, seeds: Sequence[int] | None = None,
        resume: RunState | None = None,
        on_checkpoint: Callable[[RunState, str], None] | None = None,
        dynamic_p: bool = False, sharding: jax.sharding.NamedSharding | None = None,
        compile_fn: Compiler | None = None,
        until_task: int | None = None, vectorize: bool = True) -> Result:
  """Trains tasks ``0..T-1`` in order; returns the accuracy matrix, curves and timings.

  Args:
    cfg: the configuration (its ``lam``, ``p``, ``gamma``, ``lr`` and ``seed`` are overridden
      by ``hyper``/``seeds`` in a sweep).
    net, train, test: the network and padded task data (test: one set per task). ``net`` is
      :func:`make_network` of ``cfg`` or any :class:`ewc_jax.heads.Network`, e.g.
      ``heads.make_network(cfg.scenario, groups, backbone=MyModule())`` with your own Flax linen
      backbone (protocol: :mod:`ewc_jax.backbones`; its ``batch_stats`` and other non-``params``
      collections are trained, saved and swept as described in the module docstring).
      ``preprocess`` maps a batch of ``train.inputs`` rows to the backbone's inputs (default:
      pixels / 255, shape kept: images for the convolutional backbones).
    progress: ``progress(task_index, total_steps, done_steps)`` may return a tqdm-like bar
      (``update(n)``, ``set_postfix(dict)``, ``close()``).
    hyper, seeds: a sweep: ``hyper`` fields with a leading axis of K configs and ``seeds`` of
      length K. Every piece is then ``jax.vmap``-ed over that axis (same functions, data shared;
      ``vectorize=False``: mapped, :func:`ewc_jax.continual.programs.map_configs`, each config
      bit-identical to its single run) and results carry a leading K axis.
    resume: continue from a :class:`RunState` (e.g. restored from a checkpoint).
      With ``cfg.validation_fraction > 0`` that fraction of each task's training data is held
      out (:func:`ewc_jax.continual.holdout.split`) and scored like the test sets
      (``Result.val_acc_matrix``).
    on_checkpoint: called with ``(RunState, reason)`` after every train chunk
      (``reason="chunk"``) and after each task is consolidated (``reason="task"``).
    dynamic_p: take p from ``hyper.p`` at run time (needed when a sweep varies p).
    sharding: (sweeps) a ``NamedSharding`` of the config axis over a device mesh, e.g.
      ``NamedSharding(mesh, P("config"))``; K must be a multiple of that mesh axis. Data are
      replicated on the mesh. See :mod:`ewc_jax.continual.sweep`.
    compile_fn: how the programs are compiled (:class:`ewc_jax.continual.programs.Compiler`;
      default: compiled afresh, or by JAX's persistent cache when it is on). The command lines
      pass a store of executables keyed by everything the programs are built from
      (``experiments.executable_cache.Cached``).
    until_task: stop once tasks ``0..until_task-1`` are trained, evaluated and consolidated
      (default: all); ``Result.state`` is then where the run stands (``resume`` goes on).
  """
  cfg.validate()
  num_tasks = int(train.inputs.shape[0])
  algo = make_algorithm(cfg, dynamic_p)
  validation, counts = None, train.counts
  if cfg.validation_fraction > 0:
    train, validation = holdout.split(train, cfg.validation_fraction, cfg.validation_seed)
  holdout.check_batch_size(cfg.batch_size, counts, cfg.validation_fraction)
  if algo.joint:
    train = task_data.cumulative(train)
  batched = seeds is not None
  if sharding is not None and not batched:
    raise ValueError("`sharding` needs a sweep (`seeds` and `hyper` with a config axis).")
  if batched:
    hyper, (k_init, k_order, k_fisher, k_dropout), fold, (train, test, validation) = (
        _sweep_inputs(hyper, seeds, sharding, (train, test, validation)))
  else:
    hyper = hyper_of(cfg) if hyper is None else hyper
    k_init = None  # the keys come from c.keys below (compile_programs: its abstract shape)
  timings = {"compile": 0.0, "train": 0.0, "fisher": 0.0, "eval": 0.0}

  t0 = time.perf_counter()
  c = compile_programs(cfg, net, algo, train, test, key=k_init, hyper=hyper,
                       preprocess=preprocess, batched=batched, sharding=sharding,
                       validation=validation, init=resume is None, compile_fn=compile_fn,
                       vectorize=vectorize)
  timings["compile"] = time.perf_counter() - t0
  if not batched:  # compiled: nothing is traced or compiled for them at run time
    k_init, k_order, k_fisher, k_dropout = c.keys(seed_uint32(cfg.seed))
    fold = lambda key, data: c.fold(key, i32(data))  # noqa: E731

  lead = (len(seeds),) if batched else ()
  if resume is None:
    train_state, memory = fresh_state(c, k_init, hyper.lr)
    rs = RunState(task=0, epoch=0, step=0, train_state=train_state, memory=memory,
                  acc=np.zeros(lead + (num_tasks, num_tasks)), curves=[], epoch_sums={},
                  val_acc=(None if validation is None else
                           np.zeros(lead + (num_tasks, num_tasks))),
                  diverged={} if batched else None)
  else:
    rs = resume if not batched or resume.diverged is not None else resume._replace(diverged={})
  loop = _Loop(cfg, c, train, test, validation, hyper, k_order, k_fisher, k_dropout, fold,
               lead, progress, on_checkpoint, timings)
  while rs.task < (num_tasks if until_task is None else min(until_task, num_tasks)):
    rs = _train_task(loop, rs)
    rs = _evaluate_and_consolidate(loop, rs)
    if on_checkpoint is not None:
      on_checkpoint(rs, "task")
  return Result(acc_matrix=rs.acc, curves=rs.curves, timings=timings,
                params=rs.train_state.params, memory=rs.memory, val_acc_matrix=rs.val_acc,
                model_state=rs.train_state.model_state, diverged=rs.diverged, state=rs)


def _sweep_inputs(hyper: algorithms.Hyper, seeds: Sequence[int], sharding, data: tuple):
  """A sweep's ``(hyper, (k_init, k_order, k_fisher, k_dropout), fold, data)``: float32
  hyperparameters and per-config keys with a leading config axis, ``fold_in`` vmapped over it;
  with a ``sharding`` they are placed on its mesh from host (NumPy) values (so a multi-host
  mesh works too), the ``data`` replicated, and ``fold`` keeps the keys on the mesh."""
  hyper = algorithms.Hyper(*(jnp.asarray(v, jnp.float32) for v in hyper))
  keys = jax.vmap(seed_keys)(np.array([seed_uint32(s) for s in seeds], np.uint32))
  fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
  if sharding is None:
    return hyper, keys, fold, data
  replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  hyper = jax.device_put(algorithms.Hyper(*(np.asarray(v) for v in hyper)), sharding)
  keys = tuple(
      jax.random.wrap_key_data(jax.device_put(np.asarray(jax.random.key_data(k)), sharding))
      for k in keys)
  return (hyper, keys, sweep_jit(jax.random.fold_in, (0, None), True, sharding),
          jax.device_put(data, replicated))


class _Loop(NamedTuple):
  """What the per-task parts of :func:`run` share (compiled programs, data, keys, hooks)."""
  cfg: Config
  c: Compiled
  train: task_data.TaskData
  test: task_data.TaskData
  validation: task_data.TaskData | None
  hyper: algorithms.Hyper
  k_order: jax.Array
  k_fisher: jax.Array
  k_dropout: jax.Array
  fold: Callable
  lead: tuple
  progress: Callable | None
  on_checkpoint: Callable | None
  timings: dict          # seconds, updated in place


def _train_task(loop: _Loop, rs: RunState) -> RunState:
  """Trains task ``rs.task`` from its position (epoch, step) to its end, chunk by chunk; the
  RunState after every chunk goes to ``on_checkpoint(rs, "chunk")``."""
  cfg, c, t = loop.cfg, loop.c, rs.task
  num_tasks = int(loop.train.inputs.shape[0])
  count = int(np.asarray(loop.train.counts)[t])
  epochs, steps, last_steps = cfg.schedule(count)
  state = rs.train_state
  if rs.epoch == 0 and rs.step == 0:
    if cfg.reset_optimizer or t == 0:  # the optimizer restarts at every task, or at the first
      state = c.new_state(state.params, state.model_state, loop.hyper.lr)
    rs = rs._replace(curves=rs.curves[:t] + [{k: [] for k in step_lib.METRIC_NAMES}],
                     epoch_sums={})
  done = rs.epoch * steps + rs.step
  total_steps = (epochs - 1) * steps + last_steps
  bar = (loop.progress(t, total_steps, done) if loop.progress and rs.epoch < epochs
         else None)
  t0 = time.perf_counter()
  epoch, start, sums, curves = rs.epoch, rs.step, dict(rs.epoch_sums), rs.curves
  while epoch < epochs:
    stop = last_steps if epoch == epochs - 1 else steps
    order = c.order(loop.fold(loop.fold(loop.k_order, t), epoch), i32(count))
    k_dropout = loop.fold(loop.fold(loop.k_dropout, t), epoch)
    if not sums:
      sums = {k: np.zeros(loop.lead) for k in ("count",) + step_lib.METRIC_NAMES}
    while start < stop:
      prev = start
      state, m = c.chunk(state, step_lib.ChunkInputs(
          data=loop.train, order=order, start_step=i32(start), task_index=i32(t),
          memory=rs.memory, hyper=loop.hyper, stop_step=i32(stop), key=k_dropout))
      m = jax.device_get(m)
      try:  # before anything of this chunk is kept (sums, RunState, checkpoint)
        rs = _check_chunk(m, rs, task=t, num_tasks=num_tasks, epoch=epoch, start=start,
                          steps=stop)
      except NumericalError:
        if bar is not None:
          bar.close()
        raise
      n = m["count"]
      sums = {"count": sums["count"] + n.sum(-1),
              **{k: sums[k] + np.sum(m[k] * n, -1) for k in step_lib.METRIC_NAMES}}
      start = min(start + cfg.chunk_steps, stop)
      if bar is not None:
        bar.update(start - prev)
        means = {k: float(np.mean(np.sum(m[k] * n, -1) / np.maximum(n.sum(-1), 1)))
                 for k in ("loss_cls", "loss_reg", "acc")}
        bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
      finished = start >= stop
      if finished:
        means = _epoch_means(sums)
        cur = curves[t]
        curves = curves[:t] + [{k: cur[k] + [means[k].tolist()] for k in cur}]
        epoch, start, sums = epoch + 1, 0, {}
      rs = rs._replace(epoch=epoch, step=start, train_state=state, curves=curves,
                       epoch_sums=sums)
      if loop.on_checkpoint is not None:
        loop.on_checkpoint(rs, "chunk")
      if finished:
        break
  jax.block_until_ready(state.params)
  loop.timings["train"] += time.perf_counter() - t0
  if bar is not None:
    bar.close()
  return rs._replace(train_state=state)


def _check_chunk(m: dict, rs: RunState, **where) -> RunState:
  """A chunk's finiteness check: a single run stops (:class:`NumericalError`); a sweep records
  the configs that diverged in ``rs.diverged`` and goes on (under ``vmap`` a config's NaN never
  reaches another; the caller reports them)."""
  if rs.diverged is None:
    check_finite(m, **where)
    return rs
  new = new_divergences(m, rs.diverged, **where)
  if not new:
    return rs
  return rs._replace(diverged={**rs.diverged, **{k: divergence_record(e) for k, e in new.items()}})


def _epoch_means(sums: dict) -> dict:
  total = np.maximum(sums["count"], 1.0)
  return {k: sums[k] / total for k in step_lib.METRIC_NAMES}


def _evaluate_and_consolidate(loop: _Loop, rs: RunState) -> RunState:
  """After training task t: row t of the test (and validation) accuracy matrix, then (except
  after the last task) the memory update with the importance of task t; the RunState of the
  start of task t + 1."""
  c, t, state = loop.c, rs.task, rs.train_state
  num_tasks = int(loop.train.inputs.shape[0])
  t0 = time.perf_counter()
  acc = rs.acc.copy()
  acc[..., t, :] = np.asarray(c.evaluate(state.params, state.model_state, loop.test, i32(t)))
  val_acc = rs.val_acc
  if loop.validation is not None:
    val_acc = val_acc.copy()
    val_acc[..., t, :] = np.asarray(c.evaluate_validation(
        state.params, state.model_state, loop.validation, i32(t)))
  loop.timings["eval"] += time.perf_counter() - t0
  for k in rs.diverged or {}:  # a diverged config's accuracy is not a result
    acc[k, t, :] = np.nan
    if val_acc is not None:
      val_acc[k, t, :] = np.nan
  memory = rs.memory
  if c.consolidate is not None and t < num_tasks - 1:
    t0 = time.perf_counter()
    memory = jax.block_until_ready(c.consolidate(memory, ConsolidateInputs(
        params=state.params, model_state=state.model_state, data=loop.train, task_index=i32(t),
        key=loop.fold(loop.k_fisher, t), hyper=loop.hyper)))
    loop.timings["fisher"] += time.perf_counter() - t0
  return RunState(task=t + 1, epoch=0, step=0, train_state=state, memory=memory, acc=acc,
                  curves=rs.curves, epoch_sums={}, val_acc=val_acc, diverged=rs.diverged)
