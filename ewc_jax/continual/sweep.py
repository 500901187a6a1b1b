r"""Hyperparameter sweeps: many continual-learning runs trained at once, as one vmapped program.

    from ewc_jax import continual

    from ewc_jax.continual import sweep
    configs = sweep.grid(continual.Config(epochs=2), lam=[1, 10, 100, 1000], seed=[0, 1, 2])
    result = sweep.run(configs, net, train, test)     # 12 runs: one program, a config axis
    result.acc_matrix                                  # [12, T, T]
    sweep.table(result)                                # rows sorted by average accuracy

The sweep is ``continual.run``'s batched path: the very functions of a single run over a
leading config axis (K), the task data shared, either mapped (``vectorize=False``, the default
on one CPU device: :func:`ewc_jax.continual.programs.map_configs`, a ``lax.map`` running the
configs one after another inside one program, each through the unbatched operations: every
config's accuracy matrix and curves equal its single run's **bit for bit** with the MLP
backbones (tested; when p is swept, the single run with ``dynamic_p=True``); XLA may still
compile an operation inside the loop to another kernel, seen for the gradient through a
convolution in the CNN's Fisher, 1e-9 apart) or vmapped
(``vectorize=True``, the default elsewhere: every operation batched over the configs, which an
accelerator needs; a batched matmul, reduction or convolution is another kernel than the
single run's and may round differently in the last bits, which training can amplify, so a
config's result is then close to, not equal to, its single run). On a CPU the two cost about
the same (each config's work is done either way; measured in ``benchmarks/sweep.py``).
What may differ between the configs: ``lam``, ``p``, ``gamma``, ``lr`` (numbers in
:class:`ewc_jax.algorithms.Hyper`) and ``seed`` (initialisation, shuffling, sampled labels).
Everything else (algorithm, Fisher kind, epochs, batch size, network) shapes the program and is
shared, so every chunk of a sweep runs the same programs, traced and compiled once
(:func:`ewc_jax.continual.programs.once_per_layout`). When p is swept the algorithm reads p
from ``Hyper`` at run time instead of fixing it at trace time (``continual.run(...,
dynamic_p=True)``; p = 2 then costs both penalty branches). The backbone's model state
(BatchNorm's running statistics) has the config axis like the parameters.

Memory: ``max_parallel`` caps the configs trained together; larger sweeps run as several
sweeps in sequence (chunks of equal size, so one compiled program serves them all).

Shared first task: configs that differ only in what the penalty reads
(:data:`ewc_jax.algorithms.PENALTY_ONLY`: λ, p, γ) train their first task alike when the
algorithm says so (``Algorithm.penalty_free_first_task``: the penalty of the empty memory is
exactly zero, every registered algorithm). :func:`run` groups them (:func:`prefix_groups`:
same seed and learning rate), trains, evaluates and consolidates the first task of one
representative per group, then hands every chunk the state of its configs' representatives
(``continual.run(..., resume=...)``) and goes on from task 2; every config's results are
bit-identical to the unshared sweep (``share_first_task=False``). Mapped, the representatives
run as one chunk of their own; vmapped, in chunks of the sweep's own size (the same compiled
programs: a vmapped program over another number of configs may round differently, e.g. XLA:CPU
reduces [3, 32, 32] and [4, 32, 32] with different kernels), which saves work only when the
sweep has several chunks (``max_parallel``). Not across processes.

Devices: with several devices (``devices``, default ``jax.devices()``) the config axis is
sharded over a 2-D device mesh ``('config', 'data')``:

* K >= number of devices: mesh ``(n, 1)``; each device trains K/n configs (K padded with copies
  of the last config to a multiple of n; the copies are dropped from the results).
* K < number of devices: ``c`` = the largest divisor of n that is <= K devices share the configs
  and the ``d = n / c`` devices of each config group split every batch (data parallel:
  a sharding constraint on the preprocessed batch along ``'data'``, gradients all-reduced by
  XLA). Inputs whose leading size is not a multiple of d (e.g. a Fisher or test set of odd size)
  are left replicated.

Multi-host: call ``jax.distributed.initialize()`` first (the CLI's ``--distributed``), one
process per host, all processes running the same sweep; ``jax.devices()`` is then every
device of every host and the mesh spans them all. Accuracies and metrics come back replicated,
so every process reads the same results (only process 0 should write files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ewc_jax import algorithms
from ewc_jax import checkpoint as checkpoint_lib
from ewc_jax import continual
from ewc_jax import errors
from ewc_jax import heads
from ewc_jax import interrupt
from ewc_jax.continual import metrics as metrics_lib
from ewc_jax.continual.programs import Compiler, once_per_layout
from ewc_jax.continual import step as step_lib
from ewc_jax.continual import task_data
from ewc_jax.continual.sweep_table import format_table, table

SWEEPABLE = continual.SWEEPABLE
CONFIG_AXIS, DATA_AXIS = "config", "data"


def grid(base: continual.Config, **values: Sequence) -> list[continual.Config]:
  """Every combination of ``values`` (names from :data:`SWEEPABLE`), the last name varying
  fastest; e.g. ``grid(cfg, lam=[1, 10], seed=[0, 1])`` -> (1,0), (1,1), (10,0), (10,1)."""
  for name, vals in values.items():
    if name not in SWEEPABLE:
      raise ValueError(f"`{name}` cannot be swept: expected one of {', '.join(SWEEPABLE)}.")
    if len(vals) == 0:
      raise errors.SettingError(lambda n, name=name: f"{n(name)} is invalid: expected at least "
                                "one value.")
  names = list(values)
  return [dataclasses.replace(base, **dict(zip(names, combo)))
          for combo in itertools.product(*(values[n] for n in names))]


def swept_names(configs: Sequence[continual.Config]) -> tuple[str, ...]:
  """The fields (of :data:`SWEEPABLE`) that take more than one value in ``configs``."""
  return tuple(n for n in SWEEPABLE if len({getattr(c, n) for c in configs}) > 1)


def validate(configs: Sequence[continual.Config]) -> None:
  """Every config valid (the error names the flag and the bad value), all sharing the fields
  that cannot be swept."""
  if not configs:
    raise ValueError("A sweep needs at least one config.")
  for cfg in configs:
    cfg.validate()
  first = dataclasses.asdict(configs[0])
  for cfg in configs[1:]:
    for name, value in dataclasses.asdict(cfg).items():
      if name not in SWEEPABLE and value != first[name]:
        raise errors.SettingError(lambda n, name=name, a=first[name], b=value: (
            f"{n(name)} differs between the configs of a sweep ({a!r} vs {b!r}): only "
            f"{', '.join(SWEEPABLE)} can be swept."))


class Layout(NamedTuple):
  """How a sweep of K configs is split in time (chunks) and over devices (mesh)."""
  num_configs: int          # K (real configs)
  num_chunks: int           # sweeps run in sequence
  chunk_size: int           # configs per chunk, padding included (a multiple of config_parallel)
  config_parallel: int      # devices along the mesh's 'config' axis
  data_parallel: int        # devices along the mesh's 'data' axis (splitting each batch)
  num_devices: int
  vectorized: bool = True   # jax.vmap over the configs (else lax.map: programs.map_configs)

  @property
  def padding(self) -> int:
    return self.num_chunks * self.chunk_size - self.num_configs


def plan(num_configs: int, num_devices: int = 1, max_parallel: int | None = None,
         vectorize: bool = True) -> Layout:
  """Chunks and mesh shape of a sweep (see the module docstring)."""
  if num_configs < 1:
    raise ValueError("A sweep needs at least one config.")
  if max_parallel is not None and max_parallel < 1:
    raise errors.SettingError.invalid("max_parallel", max_parallel, "an integer >= 1")
  cap = min(num_configs, max_parallel or num_configs)
  c = max(x for x in range(1, num_devices + 1) if num_devices % x == 0 and x <= cap)
  # A multiple of c: rounded down to stay <= max_parallel, else up (one chunk, padded).
  per_chunk = cap // c * c if max_parallel else -(-cap // c) * c
  num_chunks = -(-num_configs // per_chunk)
  size = -(-num_configs // num_chunks)           # balanced chunks ...
  size = -(-size // c) * c                       # ... padded to a multiple of c
  return Layout(num_configs, num_chunks, size, c, num_devices // c, num_devices, vectorize)


def make_mesh(layout: Layout, devices: Sequence[jax.Device]) -> Mesh:
  grid_ = np.asarray(devices, dtype=object).reshape(layout.config_parallel, layout.data_parallel)
  return Mesh(grid_, (CONFIG_AXIS, DATA_AXIS))


def data_parallel(preprocess: Callable, mesh: Mesh) -> Callable:
  """``preprocess`` whose output rows are split over the mesh's ``'data'`` axis (when they
  divide evenly); under the sweep's ``vmap`` the config axis goes on ``'config'``."""
  d = mesh.shape[DATA_AXIS]
  rows = NamedSharding(mesh, PartitionSpec(DATA_AXIS))

  def sharded(x):
    y = preprocess(x)
    if y.ndim >= 1 and y.shape[0] % d == 0:
      y = jax.lax.with_sharding_constraint(y, rows)
    return y
  return sharded


class SweepResult(NamedTuple):
  configs: tuple[continual.Config, ...]
  swept: tuple[str, ...]            # the fields with more than one value
  acc_matrix: np.ndarray            # [K, T, T]: R_k[i, j] of config k
  summaries: list[dict]             # per config: metrics.summarize (AA, BWT, forgetting)
  curves: list[list[dict]]          # per config, per task: {metric: [per-epoch mean]}
  timings: dict[str, float]         # seconds, summed over chunks (+ "total")
  layout: Layout
  val_acc_matrix: np.ndarray | None = None  # [K, T, T] on the validation split (if held out)
  val_summaries: list[dict] | None = None   # per config, on the validation split
  diverged: dict | None = None      # {config index: continual.divergence_record}: NaN results


def _per_config(curves: list, k: int) -> list[dict]:
  return [{name: [epoch[k] for epoch in per_epoch] for name, per_epoch in task.items()}
          for task in curves]


def prefix_groups(configs: Sequence[continual.Config]) -> list[int]:
  """Per config, its group: configs differing only in :data:`ewc_jax.algorithms.PENALTY_ONLY`
  fields (λ, p, γ) share one, numbered in order of first appearance. When the algorithm's
  first task is penalty-free (``Algorithm.penalty_free_first_task``), :func:`run` trains that
  task once per group (its first config) and hands each member its group's state."""
  shared = [n for n in SWEEPABLE if n not in algorithms.PENALTY_ONLY]
  ids: dict[tuple, int] = {}
  return [ids.setdefault(tuple(getattr(c, n) for n in shared), len(ids)) for c in configs]


class _Setup(NamedTuple):
  """A sweep's split into chunks and its placement (:func:`_setup`)."""
  layout: Layout
  sharding: NamedSharding | None
  preprocess: Callable           # with the data-parallel constraint, when the mesh has one
  padded: tuple                  # the configs, padded to whole chunks
  chunks: list[range]            # the indices (into padded) of each chunk
  compile_fn: Compiler | None


def _setup(configs: tuple, devices: list, max_parallel: int | None, preprocess: Callable, *,
           compile_fn: Compiler | None, vectorize: bool | None) -> _Setup:
  if vectorize is None:  # mapped on one CPU: the same speed there, each config its single run
    vectorize = len(devices) > 1 or devices[0].platform != "cpu"
  if not vectorize and len(devices) > 1:
    raise errors.SettingError.invalid(
        "vectorize", vectorize, f"True or None on {len(devices)} devices (False maps the "
        "configs one after another on one device: give the sweep one device)")
  layout = plan(len(configs), len(devices), max_parallel, vectorize)
  sharding = None
  if layout.num_devices > 1:
    mesh = make_mesh(layout, devices)
    sharding = NamedSharding(mesh, PartitionSpec(CONFIG_AXIS))
    if layout.data_parallel > 1:
      preprocess = data_parallel(preprocess, mesh)
  chunks = [range(i * layout.chunk_size, (i + 1) * layout.chunk_size)
            for i in range(layout.num_chunks)]
  return _Setup(layout, sharding, preprocess, configs + (configs[-1],) * layout.padding, chunks,
                once_per_layout(compile_fn))


def _hyper(part: Sequence[continual.Config]) -> algorithms.Hyper:
  return algorithms.Hyper(*(np.array([getattr(c, n) for c in part], np.float32)
                            for n in algorithms.Hyper._fields))


def _add_timings(timings: dict, new: dict) -> None:
  for name, sec in new.items():
    timings[name] = timings.get(name, 0.0) + sec


class _FirstTask(NamedTuple):
  """The state after the first task of one representative per group (a leading group axis, on
  the host): what :func:`_fan_out` hands to the members of each group."""
  trees: tuple                  # (train_state, memory), NumPy leaves [G, ...]
  acc: np.ndarray               # [G, T, T]
  val_acc: np.ndarray | None
  curves: list                  # as RunState.curves, per-epoch lists of G values
  diverged: dict                # {group: divergence_record}
  timings: dict


def _first_task_chunk_size(num_groups: int, layout: Layout) -> int:
  """Configs per chunk of the shared first task: the sweep's own chunk size when vmapped (a
  vmapped program over another number of configs may round differently), all the groups' one
  representative each in one chunk when mapped (a mapped config's bits do not depend on its
  chunk)."""
  return layout.chunk_size if layout.vectorized else num_groups


def _first_task_chunks(num_groups: int, layout: Layout) -> int:
  """The chunks that hold one representative per group."""
  return -(-num_groups // _first_task_chunk_size(num_groups, layout))


def _restore(ckpt, part: Sequence[continual.Config], net, train, setup: _Setup, *,
             preprocess: Callable, dynamic_p: bool, log, name: str):
  """The RunState of ``ckpt``'s newest checkpoint of the chunk ``part`` (None: none), with the
  "resuming from" line (``name``: which chunk)."""
  resume = ckpt.restore(lambda: continual.abstract_run_state(
      part[0], net, train, preprocess=preprocess, num_configs=len(part), dynamic_p=dynamic_p,
      sharding=setup.sharding))
  if resume is not None and log is not None:
    where = continual.describe_position(resume, part[0], np.asarray(train.counts))
    log(f"{name}: resuming from {ckpt.step_path(ckpt.restored_step)} ({where})")
  return resume


def _on_checkpoint(ckpt, stop_requested) -> Callable | None:
  """A chunk's ``on_checkpoint``: its checkpointer, else a stop at the next chunk boundary."""
  if ckpt is not None:
    return ckpt
  return interrupt.stop_hook(stop_requested) if stop_requested else None


def _first_task_parts(setup: _Setup, representatives: tuple) -> list[tuple]:
  """The representatives in chunks of :func:`_first_task_chunk_size`, the last padded with
  copies."""
  size = _first_task_chunk_size(len(representatives), setup.layout)
  num_chunks = _first_task_chunks(len(representatives), setup.layout)
  padded = representatives + (representatives[-1],) * (num_chunks * size - len(representatives))
  return [padded[i:i + size] for i in range(0, len(padded), size)]


def _train_first_task(setup: _Setup, representatives: tuple, net, train, test, *, progress,
                      preprocess: Callable, dynamic_p: bool, stop_requested,
                      checkpointer) -> _FirstTask:
  """Trains, evaluates and consolidates the first task of ``representatives`` (one config
  per group) with the sweep's own programs: chunks of its size on its mesh, padded with
  copies of the last representative (a config's bits do not depend on the other configs of
  its chunk, while a program over another number of configs may round differently); stops at
  the start of task 2. With a ``checkpointer`` each of these chunks is saved (and resumed) like
  the sweep's own (:meth:`ewc_jax.checkpoint.SweepCheckpointer.for_first_task`)."""
  parts = _first_task_parts(setup, representatives)
  states, timings, diverged = [], {}, {}
  for j, part in enumerate(parts):
    ckpt, resume = None, None
    if checkpointer is not None:
      ckpt = checkpointer.for_first_task(j, _first_task_identity(setup, part))
      resume = _restore(ckpt, part, net, train, setup, preprocess=preprocess,
                        dynamic_p=dynamic_p, log=checkpointer.log,
                        name=f"first task {j + 1}/{len(parts)}")
    with ckpt if ckpt is not None else contextlib.nullcontext():
      result = continual.run(part[0], net, train, test, preprocess=setup.preprocess,
                             progress=progress, hyper=_hyper(part),
                             seeds=[c.seed for c in part], dynamic_p=dynamic_p,
                             sharding=setup.sharding, resume=resume,
                             on_checkpoint=_on_checkpoint(ckpt, stop_requested),
                             compile_fn=setup.compile_fn, until_task=1,
                             vectorize=setup.layout.vectorized)
    states.append(result.state)
    size = len(parts[0])
    diverged.update({j * size + k: rec for k, rec in (result.diverged or {}).items()})
    _add_timings(timings, result.timings)
  cat = lambda *xs: np.concatenate(xs)  # noqa: E731
  trees = jax.tree.map(cat, *(jax.device_get((rs.train_state, rs.memory)) for rs in states))
  first = states[0]
  curves = [{m: [sum((rs.curves[t][m][e] for rs in states), []) for e in range(len(epochs))]
             for m, epochs in task.items()} for t, task in enumerate(first.curves)]
  return _FirstTask(trees=trees, acc=cat(*(rs.acc for rs in states)),
                    val_acc=(None if first.val_acc is None
                             else cat(*(rs.val_acc for rs in states))),
                    curves=curves, diverged=diverged, timings=timings)


def _first_task_identity(setup: _Setup, part: Sequence[continual.Config]) -> dict:
  return {"layout": setup.layout._asdict(),
          "first_task_configs": [dataclasses.asdict(c) for c in part]}


def _fan_out(first: _FirstTask, groups: Sequence[int], sharding) -> continual.RunState:
  """The RunState at the start of task 2 of configs whose groups are ``groups`` (each gets
  its group's representative's state, bit for bit), placed as the sweep places its state."""
  take = lambda x: np.take(x, groups, axis=0)  # noqa: E731
  train_state, memory = jax.device_put(jax.tree.map(take, first.trees), sharding)
  curves = [{m: [[epoch[g] for g in groups] for epoch in epochs] for m, epochs in task.items()}
            for task in first.curves]
  return continual.RunState(
      task=1, epoch=0, step=0, train_state=train_state, memory=memory, acc=take(first.acc),
      curves=curves, epoch_sums={}, val_acc=None if first.val_acc is None else take(first.val_acc),
      diverged={k: first.diverged[g] for k, g in enumerate(groups) if g in first.diverged})


def _shares_first_task(configs: tuple, groups: list[int], layout: Layout, train,
                       dynamic_p: bool) -> bool:
  """Whether :func:`run` trains the first task once per group: the algorithm's first task is
  penalty-free, there is a later task, one representative per group takes less work than the
  sweep's configs (its chunks hold fewer configs than the sweep's: vmapped, fewer chunks;
  mapped, fewer groups than configs), and the sweep runs in one process (the state is fanned
  out through this host)."""
  num_groups = max(groups) + 1
  saves = (_first_task_chunks(num_groups, layout) * _first_task_chunk_size(num_groups, layout)
           < layout.num_chunks * layout.chunk_size)
  return (continual.make_algorithm(configs[0], dynamic_p).penalty_free_first_task
          and int(train.inputs.shape[0]) >= 2 and jax.process_count() == 1 and saves)


def run(configs: Sequence[continual.Config], net: heads.Network, train: task_data.TaskData,
        test: task_data.TaskData, *, max_parallel: int | None = None,
        devices: Sequence[jax.Device] | None = None,
        preprocess: Callable = step_lib.scale_pixels,
        progress: Callable[..., Any] | None = None,
        chunk_progress: Callable[[int, int, range], Any] | None = None,
        checkpointer: "checkpoint_lib.SweepCheckpointer | None" = None,
        compile_fn: Compiler | None = None,
        stop_requested: interrupt.StopRequested | None = None,
        share_first_task: bool = True, vectorize: bool | None = None) -> SweepResult:
  """Trains every config on the same task sequence; see the module docstring.

  Args:
    configs: the runs (e.g. from :func:`grid`); only :data:`SWEEPABLE` fields may differ.
    net, train, test: as for :func:`ewc_jax.continual.run` (shared by every config).
    max_parallel: at most this many configs per vmapped sweep (padding included); more run as
      several sweeps in sequence. Default: all at once.
    devices: the devices of the mesh (default ``jax.devices()``: every device, every host).
    progress: as for ``continual.run`` (one bar per task of each chunk).
    chunk_progress: called ``(chunk_index, num_chunks, config_indices)`` before each chunk.
    checkpointer: a :class:`ewc_jax.checkpoint.SweepCheckpointer`: every chunk's whole batched
      state is saved after each task (and every ``every`` steps), and restored from when the
      folder holds it (resume: bit-identical). Every chunk's checkpoint is checked to come from
      this sweep (configs, layout) before anything is trained.
    compile_fn: as for ``continual.run``; the chunks' programs go through it once per layout
      (:func:`ewc_jax.continual.programs.once_per_layout`: the chunks of a sweep share their
      programs; the :class:`~ewc_jax.continual.programs.Uncompiled` ``layout`` names the configs
      per chunk and the mesh). The command lines pass a store keyed by the shared settings.
    stop_requested: without a ``checkpointer``, ``stop_requested()`` naming a signal ends the
      sweep at the next chunk boundary (:func:`ewc_jax.interrupt.stop_hook`; the checkpointer's
      own ``stop_requested`` saves first).
    share_first_task: train the first task once per :func:`prefix_groups` group when the
      algorithm allows it and the representatives fill fewer chunks than the sweep has (with a
      ``checkpointer``, saved under ``first_task_<i>``); ``False``: every config trains it
      (the same bits, more work).
    vectorize: ``True``: ``jax.vmap`` over the configs (each op batched: what an accelerator
      needs; each config equals its single run to float tolerance); ``False``: ``lax.map``
      (:func:`ewc_jax.continual.programs.map_configs`: one config after another, each
      bit-identical to its single run; one device only); ``None`` (default): ``False`` on a
      single CPU device, where both cost about the same, else ``True``.
  """
  configs = tuple(configs)
  validate(configs)
  swept = swept_names(configs)
  devices = list(jax.devices() if devices is None else devices)
  dynamic_p = "p" in swept
  setup = _setup(configs, devices, max_parallel, preprocess, compile_fn=compile_fn,
                 vectorize=vectorize)
  layout, sharding, padded, chunks = setup.layout, setup.sharding, setup.padded, setup.chunks
  groups = prefix_groups(padded)
  first_task = None  # trained when a chunk needs it (none: every chunk restored)
  shared = share_first_task and _shares_first_task(configs, groups, layout, train, dynamic_p)
  representatives = tuple(padded[groups.index(g)] for g in range(max(groups) + 1))

  def identity(i):
    return {"layout": layout._asdict(),
            "chunk_configs": [dataclasses.asdict(padded[k]) for k in chunks[i]]}

  if checkpointer is not None:  # every chunk from this sweep, before anything is trained
    for i in range(layout.num_chunks):
      with checkpointer.for_chunk(i, identity(i)) as ckpt:
        ckpt.check_config()
    for j, part in enumerate(_first_task_parts(setup, representatives) if shared else []):
      with checkpointer.for_first_task(j, _first_task_identity(setup, part)) as ckpt:
        ckpt.check_config()

  t_start = time.perf_counter()
  mats, val_mats, curves, timings, diverged = [], [], [], {}, {}
  for i, idx in enumerate(chunks):
    part = [padded[k] for k in idx]
    if chunk_progress is not None:
      chunk_progress(i, layout.num_chunks, range(idx.start, min(idx.stop, len(configs))))
    hyper = _hyper(part)
    ckpt, resume = None, None
    if checkpointer is not None:
      ckpt = checkpointer.for_chunk(i, identity(i))
      resume = _restore(ckpt, part, net, train, setup, preprocess=preprocess,
                        dynamic_p=dynamic_p, log=checkpointer.log,
                        name=f"chunk {i + 1}/{layout.num_chunks}")
    if resume is None and shared:  # the first task: trained once per group, then fanned out
      if first_task is None:
        first_task = _train_first_task(
            setup, representatives, net, train, test, progress=progress, preprocess=preprocess,
            dynamic_p=dynamic_p, stop_requested=stop_requested, checkpointer=checkpointer)
        _add_timings(timings, first_task.timings)
      resume = _fan_out(first_task, [groups[k] for k in idx], sharding)
    with ckpt if ckpt is not None else contextlib.nullcontext():
      result = continual.run(part[0], net, train, test, preprocess=setup.preprocess,
                             progress=progress, hyper=hyper, seeds=[c.seed for c in part],
                             dynamic_p=dynamic_p, sharding=sharding, resume=resume,
                             on_checkpoint=_on_checkpoint(ckpt, stop_requested),
                             compile_fn=setup.compile_fn, vectorize=layout.vectorized)
    mats.append(np.array(result.acc_matrix))
    if result.val_acc_matrix is not None:
      val_mats.append(np.array(result.val_acc_matrix))
    for k, record in (result.diverged or {}).items():  # its whole matrix: not a result
      if idx.start + k < len(configs):
        diverged[idx.start + k] = record
      mats[-1][k] = np.nan
      if val_mats:
        val_mats[-1][k] = np.nan
    curves += [_per_config(result.curves, k) for k in range(len(part))]
    _add_timings(timings, result.timings)
  timings["total"] = time.perf_counter() - t_start
  acc = np.concatenate(mats)[:len(configs)]
  val = np.concatenate(val_mats)[:len(configs)] if val_mats else None
  return SweepResult(configs=configs, swept=swept, acc_matrix=acc,
                     summaries=[metrics_lib.summarize(a) for a in acc],
                     curves=curves[:len(configs)], timings=timings, layout=layout,
                     val_acc_matrix=val,
                     val_summaries=None if val is None else [metrics_lib.summarize(a)
                                                             for a in val],
                     diverged=dict(sorted(diverged.items())))


__all__ = ["CONFIG_AXIS", "DATA_AXIS", "Layout", "SWEEPABLE", "SweepResult", "data_parallel",
           "format_table", "grid", "make_mesh", "plan", "prefix_groups", "run", "swept_names",
           "table", "validate"]
