r"""Hyperparameter sweeps: many continual-learning runs trained at once, as one vmapped program.

    from ewc_jax import continual

    from ewc_jax.continual import sweep
    configs = sweep.grid(continual.Config(epochs=2), lam=[1, 10, 100, 1000], seed=[0, 1, 2])
    result = sweep.run(configs, net, train, test)     # 12 runs: one program, a config axis
    result.acc_matrix                                  # [12, T, T]
    sweep.table(result)                                # rows sorted by average accuracy

Every config of a sweep gives the accuracy matrix of :func:`ewc_jax.continual.run` with that
config alone (to float tolerance): the sweep is ``continual.run``'s batched path, i.e.
``jax.vmap`` of the very functions of a single run over a leading config axis (K), the task data
shared. What may differ between the configs: ``lam``, ``p``, ``gamma``, ``lr`` (numbers in
:class:`ewc_jax.algorithms.Hyper`) and ``seed`` (initialisation, shuffling, sampled labels).
Everything else (algorithm, Fisher kind, epochs, batch size, network) shapes the program and is
shared. When p is swept the algorithm reads p from ``Hyper`` at run time instead of fixing it at
trace time (``continual.run(..., dynamic_p=True)``; p = 2 then costs both penalty branches).
The backbone's model state (BatchNorm's running statistics) has the config axis like the
parameters. Convolutional backbones: a convolution with one kernel per config is another XLA
kernel than a single one (a grouped convolution), equal to the last bits only (~1e-7 relative),
and training can amplify such differences (e.g. a CNN escaping a loss plateau within a few Adam
steps): a config's result is then close to, not equal to, its single run.

Memory: ``max_parallel`` caps the configs trained together; larger sweeps run as several
sweeps in sequence (chunks of equal size, so one compiled program serves them all).

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
from ewc_jax import executable_cache
from ewc_jax import heads
from ewc_jax import interrupt
from ewc_jax.continual import metrics as metrics_lib
from ewc_jax.continual import step as step_lib
from ewc_jax.continual import task_data

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

  @property
  def padding(self) -> int:
    return self.num_chunks * self.chunk_size - self.num_configs


def plan(num_configs: int, num_devices: int = 1, max_parallel: int | None = None) -> Layout:
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
  return Layout(num_configs, num_chunks, size, c, num_devices // c, num_devices)


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


def run(configs: Sequence[continual.Config], net: heads.Network, train: task_data.TaskData,
        test: task_data.TaskData, *, max_parallel: int | None = None,
        devices: Sequence[jax.Device] | None = None,
        preprocess: Callable = step_lib.scale_pixels,
        progress: Callable[..., Any] | None = None,
        chunk_progress: Callable[[int, int, range], Any] | None = None,
        checkpointer: "checkpoint_lib.SweepCheckpointer | None" = None,
        executables: "executable_cache.Cached | None" = None,
        stop_requested: interrupt.StopRequested | None = None) -> SweepResult:
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
    executables: a store of compiled programs and the key of the shared settings (as for
      ``continual.run``: everything the programs are built from but the swept values); the
      layout (configs per chunk, mesh shape) and whether p is read at run time are added to
      the key here. Every chunk then loads the programs the first one compiled.
    stop_requested: without a ``checkpointer``, ``stop_requested()`` naming a signal ends the
      sweep at the next chunk boundary (:func:`ewc_jax.interrupt.stop_hook`; the checkpointer's
      own ``stop_requested`` saves first).
  """
  configs = tuple(configs)
  validate(configs)
  swept = swept_names(configs)
  devices = list(jax.devices() if devices is None else devices)
  layout = plan(len(configs), len(devices), max_parallel)
  sharding, abstract_preprocess = None, preprocess
  if layout.num_devices > 1:
    mesh = make_mesh(layout, devices)
    sharding = NamedSharding(mesh, PartitionSpec(CONFIG_AXIS))
    if layout.data_parallel > 1:
      preprocess = data_parallel(preprocess, mesh)
  padded = configs + (configs[-1],) * layout.padding
  dynamic_p = "p" in swept
  if executables is not None:
    executables = executable_cache.Cached(executables.store, (
        f"{executables.key}-k{layout.chunk_size}-c{layout.config_parallel}"
        f"-d{layout.data_parallel}-p{int(dynamic_p)}"))
  chunks = [range(i * layout.chunk_size, (i + 1) * layout.chunk_size)
            for i in range(layout.num_chunks)]

  def identity(i):
    return {"layout": layout._asdict(),
            "chunk_configs": [dataclasses.asdict(padded[k]) for k in chunks[i]]}

  if checkpointer is not None:  # every chunk from this sweep, before anything is trained
    for i in range(layout.num_chunks):
      with checkpointer.for_chunk(i, identity(i)) as ckpt:
        ckpt.check_config()

  t_start = time.perf_counter()
  mats, val_mats, curves, timings, diverged = [], [], [], {}, {}
  for i, idx in enumerate(chunks):
    part = [padded[k] for k in idx]
    if chunk_progress is not None:
      chunk_progress(i, layout.num_chunks, range(idx.start, min(idx.stop, len(configs))))
    hyper = algorithms.Hyper(*(np.array([getattr(c, n) for c in part], np.float32)
                               for n in algorithms.Hyper._fields))
    ckpt, resume = None, None
    if checkpointer is not None:
      ckpt = checkpointer.for_chunk(i, identity(i))
      resume = ckpt.restore(lambda part=part: continual.abstract_run_state(
          part[0], net, train, preprocess=abstract_preprocess, num_configs=len(part),
          dynamic_p=dynamic_p, sharding=sharding))
      if resume is not None and checkpointer.log is not None:
        where = continual.describe_position(resume, part[0], np.asarray(train.counts))
        checkpointer.log(f"chunk {i + 1}/{layout.num_chunks}: resuming from "
                         f"{ckpt.step_path(ckpt.restored_step)} ({where})")
    with ckpt if ckpt is not None else contextlib.nullcontext():
      result = continual.run(part[0], net, train, test, preprocess=preprocess,
                             progress=progress, hyper=hyper, seeds=[c.seed for c in part],
                             dynamic_p=dynamic_p, sharding=sharding, resume=resume,
                             on_checkpoint=ckpt if ckpt is not None else (
                                 interrupt.stop_hook(stop_requested) if stop_requested
                                 else None),
                             executables=executables)
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
    for name, sec in result.timings.items():
      timings[name] = timings.get(name, 0.0) + sec
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


def table(result: SweepResult) -> list[dict]:
  """One row per combination of the swept values other than the seed, aggregated over seeds
  (mean and population std), sorted by mean average accuracy, best first.

  With a validation split (``Config.validation_fraction > 0``) the rows also hold
  ``val_average_accuracy`` (and ``_std``) and are ranked by it: hyperparameters are chosen on
  the validation split, never on the test set."""
  keys = [n for n in result.swept if n != "seed"]
  groups: dict[tuple, list[int]] = {}
  for k, cfg in enumerate(result.configs):
    groups.setdefault(tuple(getattr(cfg, n) for n in keys), []).append(k)
  rows = []
  for values, members in groups.items():
    row = dict(zip(keys, values))
    row["seeds"] = [result.configs[k].seed for k in members]
    row["diverged_seeds"] = [result.configs[k].seed for k in members
                             if k in (result.diverged or {})]
    for metric in ("average_accuracy", "bwt", "mean_forgetting"):
      vals = np.array([result.summaries[k][metric] for k in members])
      row[metric] = float(vals.mean())
      row[metric + "_std"] = float(vals.std())
    if result.val_summaries is not None:
      vals = np.array([result.val_summaries[k]["average_accuracy"] for k in members])
      row["val_average_accuracy"] = float(vals.mean())
      row["val_average_accuracy_std"] = float(vals.std())
    rows.append(row)
  rank = "val_average_accuracy" if result.val_summaries is not None else "average_accuracy"
  rows.sort(key=lambda r: (np.isnan(r[rank]), -r[rank] if not np.isnan(r[rank]) else 0.0))
  return rows


def format_table(rows: list[dict], keys: Sequence[str]) -> str:
  """The rows of :func:`table` as text (percent); the validation AA first when there is one."""
  val = bool(rows) and "val_average_accuracy" in rows[0]
  head = ("".join(f"{k:>10}" for k in keys) + (f"{'val AA (%)':>16}" if val else "")
          + f"{'AA (%)':>16}{'BWT (%)':>16}{'forget (%)':>12}{'seeds':>7}")
  lines = [head, "-" * len(head)]
  for r in rows:
    if r.get("diverged_seeds"):
      seeds = ",".join(map(str, r["diverged_seeds"]))
      lines.append("".join(f"{r[k]:>10g}" for k in keys)
                   + f"   diverged (seed {seeds}): no result")
      continue
    lines.append("".join(f"{r[k]:>10g}" for k in keys)
                 + (f"{100 * r['val_average_accuracy']:>9.2f} ± "
                    f"{100 * r['val_average_accuracy_std']:<4.2f}" if val else "")
                 + f"{100 * r['average_accuracy']:>9.2f} ± {100 * r['average_accuracy_std']:<4.2f}"
                 + f"{100 * r['bwt']:>+9.2f} ± {100 * r['bwt_std']:<4.2f}"
                 + f"{100 * r['mean_forgetting']:>12.2f}{len(r['seeds']):>7d}")
  return "\n".join(lines)


__all__ = ["CONFIG_AXIS", "DATA_AXIS", "Layout", "SWEEPABLE", "SweepResult", "data_parallel",
           "format_table", "grid", "make_mesh", "plan", "run", "swept_names", "table",
           "validate"]
