"""The compiled programs of a run: the pure functions (:func:`programs`), ``jit`` / ``vmap`` over
a sweep's config axis with its sharding (:func:`sweep_jit`), ahead-of-time compilation through
a :class:`Compiler` hook (:func:`compile_programs`), and the PRNG stream layout
(:func:`seed_keys`)."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import re
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax import algorithms
from ewc_jax import augment as augment_lib
from ewc_jax import compiler_options
from ewc_jax import errors
from ewc_jax import fisher as fisher_lib
from ewc_jax import heads
from ewc_jax import initializers
from ewc_jax import subset
from ewc_jax.continual import step as step_lib
from ewc_jax.continual import task_data
from ewc_jax.continual.config import Config

DROPOUT_STREAM = 0x64726F70  # fold_in(k_order, ·) of the dropout keys ("drop"; never a task index)
SUBSET_STREAM = 0x73756273  # fold_in(Fisher key, ·) of the fisher_examples rows ("subs")


class ConsolidateInputs(NamedTuple):
  """What the consolidation program reads besides the memory: the trained ``params`` and
  ``model_state``, the training ``data``, the task just trained (``task_index``, int32), the
  Fisher's ``key`` and the ``hyper``-parameters."""
  params: Any
  model_state: Any
  data: task_data.TaskData
  task_index: Any
  key: jax.Array
  hyper: algorithms.Hyper


# The sweep's config axis of each input: 0 (one value per config) or None (shared).
CONSOLIDATE_AXES = ConsolidateInputs(params=0, model_state=0, data=None, task_index=None, key=0,
                                     hyper=0)


class Programs(NamedTuple):
  """The pure functions of one run, ready to ``jit`` (or ``vmap`` then ``jit`` for sweeps)."""
  init: Callable        # (key) -> (params, model_state)
  new_state: Callable   # (params, model_state, lr) -> TrainState with a fresh optimizer
  init_memory: Callable  # (params) -> the algorithm's empty memory of the consolidated part
  order: Callable       # (key, count) -> [steps_max * B] int32
  chunk: Callable       # (state, step.ChunkInputs) -> (state, metrics)
  evaluate: Callable    # (params, model_state, test, trained_task) -> [T]
  consolidate: Callable  # (memory, ConsolidateInputs) -> memory
  steps_per_epoch: int  # for the largest task


def programs(cfg: Config, net: heads.Network, algo: algorithms.Algorithm,
             train: task_data.TaskData, preprocess: Callable = step_lib.scale_pixels) -> Programs:
  tx = step_lib.make_optimizer(cfg.optimizer)
  n_max = train.inputs.shape[1]
  steps = _steps_per_epoch(cfg, train)
  example = preprocess(train.inputs[0, :1])

  mode = cfg.consolidated

  def consolidate(memory, inputs: ConsolidateInputs):
    params, model_state, data, task_index, key, hyper = inputs
    theta = heads.consolidated(net, params, mode)
    if algo.importance == "unit":
      importance = jax.tree.map(jnp.ones_like, theta)
    else:
      x = data.inputs[task_index]  # preprocessed batch by batch (no [N, ...] float copy)
      mask = jnp.arange(x.shape[0]) < data.counts[task_index]
      if cfg.fisher_examples is not None:  # n rows at random (the labels' key left as it is)
        mask = subset.random_rows(jax.random.fold_in(key, SUBSET_STREAM), mask,
                                  cfg.fisher_examples)
      task_logits = heads.consolidated_logits_fn(net, params, task_index, model_state)
      importance = fisher_lib.fisher_diagonal(
          lambda theta, xb: task_logits(theta, preprocess(xb)), theta, x,
          data.labels[task_index], kind=cfg.fisher,
          batch_size=cfg.fisher_batch_size, key=key, mask=mask,
          normalize_by_num_params=cfg.fisher_normalize,
          runtime_checks=False)  # labels checked when the data are built; no host callback
    return algo.consolidate(memory, theta, importance, task_index, hyper)

  def evaluate(params, model_state, data, trained_task):
    return step_lib.evaluate(net, preprocess, params, data, trained_task, model_state)

  num_tasks = int(train.inputs.shape[0])
  return Programs(
      init=lambda key: _initial_variables(cfg, net, key, example),
      new_state=lambda params, model_state, lr: step_lib.init_train_state(tx, params, lr,
                                                                          model_state),
      init_memory=lambda params: algo.init(heads.consolidated(net, params, mode), num_tasks),
      order=lambda key, count: step_lib.epoch_order(key, count, n_max, steps * cfg.batch_size),
      chunk=functools.partial(step_lib.train_chunk, step_lib.Step(
          net=net, algo=algo, tx=tx, preprocess=preprocess, batch_size=cfg.batch_size,
          num_steps=cfg.chunk_steps, consolidate=mode, augment=augment_lib.make(cfg.augment))),
      evaluate=evaluate,
      consolidate=consolidate,
      steps_per_epoch=steps)


def _steps_per_epoch(cfg: Config, train: task_data.TaskData) -> int:
  """Train steps of an epoch of the largest task (a partial last batch is a step)."""
  return -(-int(train.inputs.shape[1]) // cfg.batch_size)


def _initial_variables(cfg: Config, net: heads.Network, key: jax.Array, example: jax.Array):
  """``(params, model_state)`` of ``net`` from ``key``, with ``cfg.init``'s initialisation."""
  params, model_state = heads.init_variables(net, key, example)
  return initializers.apply(cfg.init, jax.random.fold_in(key, 0x1417), params), model_state


def seed_uint32(seed: int) -> np.uint32:
  """``seed`` as the uint32 whose ``jax.random.key`` equals ``jax.random.key(seed)`` of the
  Python integer (x64 off: the key's data are ``[0, seed mod 2**32]``)."""
  if not -2**63 <= int(seed) < 2**64:
    raise errors.SettingError.invalid("seed", seed, "an integer in [-2**63, 2**64)")
  return np.uint32(int(seed) % 2**32)


def i32(x) -> np.int32:
  """An int32 argument of the compiled programs (NumPy: no eager device op to compile)."""
  return np.int32(x)



def fresh_state(progs: Programs | Compiled, key: jax.Array, lr) -> tuple[step_lib.TrainState,
                                                                         Any]:
  """``(train_state, memory)`` at the start of a run: the variables from ``key``
  (``progs.init``), a fresh optimizer with learning rate ``lr`` and the algorithm's empty memory
  (of the pure :class:`Programs`, e.g. under ``jax.eval_shape``, or of the :class:`Compiled`
  ones)."""
  params, model_state = progs.init(key)
  return progs.new_state(params, model_state, lr), progs.init_memory(params)


class Compiled(NamedTuple):
  """The compiled programs of a run (:func:`compile_programs`): those of :class:`Programs`, plus
  the validation split's evaluation and, for a single run, its PRNG keys."""
  init: Callable | None  # None when compiled for a resumed run (nothing to initialise)
  init_memory: Callable | None  # (params) -> the algorithm's empty memory
  new_state: Callable    # (params, model_state, lr) -> TrainState with a fresh optimizer
  order: Callable
  chunk: Callable
  evaluate: Callable
  consolidate: Callable | None
  steps_per_epoch: int
  evaluate_validation: Callable | None = None
  keys: Callable | None = None  # single run: (uint32 seed) -> (init, order, fisher, dropout keys)
  fold: Callable | None = None  # single run: (key, int32) -> jax.random.fold_in(key, ·)


def seed_keys(seed):
  """A run's PRNG keys from its seed: ``(k_init, k_order, k_fisher, k_dropout)``, the first three
  from ``split(key(seed), 3)`` and the dropout stream ``fold_in(k_order, DROPOUT_STREAM)``."""
  k_init, k_order, k_fisher = jax.random.split(jax.random.key(seed), 3)
  return k_init, k_order, k_fisher, jax.random.fold_in(k_order, DROPOUT_STREAM)


def sweep_jit(f: Callable, axes, batched: bool, sharding=None, out=0, *, vectorize: bool = True,
              **kw) -> Callable:
  """``jit(f)``; when ``batched``, ``jit(vmap(f, axes))`` (``vectorize``) or
  ``jit(map_configs(f, axes))`` (configs one after another, each on the single run's own
  operations: :func:`map_configs`). With a config ``sharding`` (a ``NamedSharding`` whose first
  spec entry names the config mesh axis; ``vectorize`` only) the vmapped arguments (axis 0) and
  the outputs marked 0 in ``out`` (a prefix of the outputs) are sharded along the config axis;
  the shared arguments (None) and outputs marked None are replicated on the mesh (small results
  read back on the host: readable on every process of a multi-host mesh)."""
  if batched and not vectorize:
    if sharding is not None:
      raise ValueError("A config `sharding` needs `vectorize=True` (the mapped configs run one "
                       "after another on one device).")
    f = map_configs(f, axes)
  elif batched:
    spmd = None if sharding is None else sharding.spec[0]
    f = jax.vmap(f, in_axes=axes, spmd_axis_name=spmd)
  if sharding is None:
    return jax.jit(f, **kw)
  replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  axes = axes if type(axes) is tuple else (axes,)  # a NamedTuple is one argument
  place = lambda a: replicated if a is None else sharding  # noqa: E731
  in_shardings = jax.tree.map(place, axes, is_leaf=lambda a: a is None)
  return jax.jit(f, in_shardings=in_shardings,
                 out_shardings=tuple(map(place, out)) if isinstance(out, tuple) else place(out),
                 **kw)


class _Mapped(NamedTuple):
  """Where :func:`map_configs` puts the ``index``-th mapped argument back."""
  index: int


def map_configs(f: Callable, in_axes) -> Callable:
  """``f`` over a leading config axis like ``jax.vmap(f, in_axes)`` (``in_axes``: 0 or None per
  argument, a prefix of the arguments' trees; outputs stacked on axis 0), but as a
  ``lax.map``: the configs run one after another, each through the very operations of the
  unbatched ``f``. So each config's results equal ``f`` on that config alone bit for bit
  (unless XLA compiles an operation inside the loop to another kernel: seen for the gradient
  through a convolution, 1e-9 apart), which a vmapped program does not promise (a batched
  matmul, reduction or convolution is another kernel and may round differently); on a CPU it
  costs about what vmap does.

  >>> import jax.numpy as jnp
  >>> g = map_configs(lambda x, w: x @ w, (0, None))
  >>> g(jnp.ones((3, 2, 4)), jnp.ones((4, 5))).shape
  (3, 2, 5)
  """
  axes = in_axes if type(in_axes) is tuple else (in_axes,)  # a NamedTuple is one argument

  def mapped(*args):
    batched = []

    def mark(axis, tree):
      if axis is None:
        return tree
      if axis != 0:
        raise ValueError(f"map_configs maps axis 0 only, not in_axes={axis!r}.")
      batched.append(tree)
      return _Mapped(len(batched) - 1)

    marked = jax.tree.map(mark, axes, args, is_leaf=lambda a: a is None)

    def one(xs):
      return f(*jax.tree.map(lambda m: xs[m.index] if isinstance(m, _Mapped) else m, marked,
                             is_leaf=lambda m: isinstance(m, _Mapped)))
    return jax.lax.map(one, batched)
  name = getattr(f, "__name__", None) or getattr(getattr(f, "func", None), "__name__", "f")
  mapped.__name__ = mapped.__qualname__ = name  # the program's name, as under vmap
  return mapped


class Uncompiled(NamedTuple):
  """What :func:`compile_programs` hands its :class:`Compiler`.

  Attributes:
    names: the programs to return, by name (``"chunk"``, ``"evaluate"``, ...).
    layout: their shapes beyond what the configuration fixes: ``""`` for a single run on one
      device, else ``configs<K>`` (a sweep's vmapped config axis; ``mapped<K>``: mapped) and
      ``<axis><size>`` per mesh axis, joined by ``-`` (letters and digits only), e.g.
      ``configs8-config2-data1``.
    lower: ``lower(suffix)``: every program traced and lowered from abstract shapes (nothing
      runs); with a ``suffix`` each is named ``<function>_<suffix>``. The name is part of the
      lowered module, hence of the key of JAX's persistent compilation cache.
  """
  names: tuple[str, ...]
  layout: str
  lower: Callable[[str | None], dict[str, Any]]


class Compiler(Protocol):
  """How a run turns its programs into executables (``compile_fn``): returns a mapping with
  every name of ``programs.names`` (``jax.stages.Compiled``, or anything that calls alike).
  The default, :func:`compile_lowered` of ``programs.lower(None)``; a command line may load
  them from a store instead, or name them with ``lower(suffix)`` and save them."""

  def __call__(self, programs: Uncompiled) -> Mapping[str, Callable]: ...


def compile_lowered(lowered: Mapping[str, Any]) -> dict[str, Any]:
  """Compiles every ``jax.stages.Lowered`` of ``lowered`` with the options of
  :mod:`ewc_jax.compiler_options`, on a thread pool (the XLA
  compilations release the GIL; the init program, one random op per parameter, compiles about
  as long as the train chunk)."""
  workers = max(1, min(len(lowered), os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers,
                                             thread_name_prefix="ewc_jax-compile") as ex:
    return dict(zip(lowered, ex.map(compiler_options.compile_program, lowered.values())))


def default_compiler(programs_: Uncompiled) -> dict[str, Any]:
  """The :class:`Compiler` of a run given none: compiles the programs, unnamed."""
  return compile_lowered(programs_.lower(None))


def once_per_layout(compile_fn: Compiler | None = None) -> Compiler:
  """A :class:`Compiler` that hands each ``layout`` to ``compile_fn`` (default
  :func:`default_compiler`) once and serves its programs to every later request of that layout
  whose names it holds, without lowering them again.

  For the chunks of one sweep (:func:`ewc_jax.continual.sweep.run`): their configs differ only
  in what the programs take as arguments (:class:`ewc_jax.algorithms.Hyper`, the seeds' keys),
  so chunks of one layout are the same programs; tracing and lowering them is most of a warm
  start (about 0.5 s per chunk for the MLP on a CPU, against 0.1 s to load them compiled).
  """
  done: dict[str, Any] = {}

  def compiler(programs_: Uncompiled) -> Mapping[str, Callable]:
    have = done.get(programs_.layout)
    if have is None or not set(programs_.names) <= set(have):
      have = (compile_fn or default_compiler)(programs_)
      if not isinstance(have, Mapping):
        return have  # compile_programs names the bad hook
      done[programs_.layout] = have
    return {name: have[name] for name in programs_.names if name in have}
  return compiler


def compile_programs(cfg: Config, net: heads.Network, algo: algorithms.Algorithm,
                     train: task_data.TaskData, test: task_data.TaskData, *,
                     key: jax.Array | None, hyper: algorithms.Hyper, preprocess: Callable,
                     batched: bool, sharding=None, validation: task_data.TaskData | None = None,
                     init: bool = True, compile_fn: Compiler | None = None,
                     vectorize: bool = True) -> Compiled:
  """Ahead-of-time compiles every piece once (``batched``: over a leading config axis, vmapped
  when ``vectorize``, else mapped: :func:`map_configs`).

  Every piece is lowered from abstract shapes (nothing runs), then ``compile_fn`` (a
  :class:`Compiler`; default :func:`default_compiler`) turns them into executables.
  ``init=False`` (a resumed run) lowers the init programs (parameters, empty memory) for their
  shapes but does not compile them.

  The sweep path is literally ``jax.vmap`` (or :func:`map_configs`) of the single-run
  functions, data shared;
  ``sharding`` places the config axis on a device mesh (see :func:`sweep_jit`).

  ``key``: the init key (its shape and type; ``None``: a single run's, whose keys then come
  from the compiled ``keys`` program, with ``fold`` for their ``fold_in``).
  """
  num_tasks = int(train.inputs.shape[0])
  names = ["order", "new_state", "chunk", "evaluate"]
  names += ["init", "init_memory"] if init else []
  names += ["evaluate_validation"] if validation is not None else []
  names += ["consolidate"] if algo.importance is not None and num_tasks > 1 else []
  names += ["keys", "fold"] if not batched else []

  def lower(suffix: str | None) -> dict[str, Any]:
    progs = programs(cfg, net, algo, train, preprocess)
    jit = functools.partial(sweep_jit, batched=batched, sharding=sharding, vectorize=vectorize)
    if suffix is not None:
      jit = _named(jit, suffix)
    lowered = _lower_all(jit, progs, names, key=key, hyper=hyper,
                         data=(train, test, validation))
    return {name: lowered[name] for name in names}  # without init: its shapes only

  compiled = (compile_fn or default_compiler)(
      Uncompiled(tuple(names), _layout(hyper, batched, sharding, vectorize), lower))
  if not isinstance(compiled, Mapping):
    raise TypeError(f"`compile_fn` must return a mapping from program names to executables, "
                    f"but returned {type(compiled).__name__}.")
  missing = [name for name in names if name not in compiled]
  if missing:
    raise ValueError(f"`compile_fn` returned no program named {', '.join(missing)}; it must "
                     f"return every name of `programs.names`.")
  return _compiled(compiled, _steps_per_epoch(cfg, train))


def _layout(hyper: algorithms.Hyper, batched: bool, sharding, vectorize: bool) -> str:
  kind = "configs" if vectorize else "mapped"
  parts = [f"{kind}{int(np.shape(hyper.lam)[0])}"] if batched else []
  if sharding is not None:
    parts += [re.sub(r"[^A-Za-z0-9]", "", str(name)) + str(size)
              for name, size in sharding.mesh.shape.items()]
  return "-".join(parts)


def _lower_all(jit: Callable, progs: Programs, names: Sequence[str], *, key,
               hyper: algorithms.Hyper, data: tuple) -> dict[str, Any]:
  """The programs of ``progs`` lowered from abstract shapes, by name: those of ``names``, and
  ``init`` (for its shapes) in any case."""
  train, test, validation = data
  if key is None:  # a single run's key, for its shape (traced only when compiling)
    key = jax.eval_shape(lambda: jax.random.key(0))
  zero = i32(0)
  lowered = {"init": jit(progs.init, 0).lower(key),
             "order": jit(progs.order, (0, None)).lower(key, zero)}
  (params, model_state), order0 = lowered["init"].out_info, lowered["order"].out_info
  lowered["init_memory"] = jit(progs.init_memory, 0).lower(params)
  lowered["new_state"] = jit(progs.new_state, (0, 0, 0)).lower(params, model_state, hyper.lr)
  memory, state = lowered["init_memory"].out_info, lowered["new_state"].out_info
  lowered["chunk"] = jit(progs.chunk, (0, step_lib.CHUNK_AXES), out=(0, None),
                         donate_argnums=0).lower(state, step_lib.ChunkInputs(
                             data=train, order=order0, start_step=zero, task_index=zero,
                             memory=memory, hyper=hyper, stop_step=zero, key=key))
  lowered["evaluate"] = jit(progs.evaluate, (0, 0, None, None), out=None).lower(
      params, model_state, test, zero)
  if "evaluate_validation" in names:
    lowered["evaluate_validation"] = jit(progs.evaluate, (0, 0, None, None), out=None).lower(
        params, model_state, validation, zero)
  if "consolidate" in names:
    lowered["consolidate"] = jit(progs.consolidate, (0, CONSOLIDATE_AXES),
                                 donate_argnums=0).lower(memory, ConsolidateInputs(
                                     params=params, model_state=model_state, data=train,
                                     task_index=zero, key=key, hyper=hyper))
  if "keys" in names:  # a single run: the seed's keys and their fold_in, compiled like the rest
    lowered["keys"] = jit(seed_keys, 0, out=None).lower(np.uint32(0))
    lowered["fold"] = jit(jax.random.fold_in, (0, None), out=None).lower(key, zero)
  return lowered


def _named(jit: Callable, suffix: str) -> Callable:
  """``jit`` whose programs are named ``<function>_<suffix>`` (see :class:`Uncompiled`)."""

  def named_jit(f, *args, **kwargs):
    def program(*a, **k):
      return f(*a, **k)
    name = getattr(f, "__name__", None) or getattr(getattr(f, "func", None), "__name__",
                                                   "program")
    program.__name__ = program.__qualname__ = f"{name.strip('<>')}_{suffix}"
    return jit(program, *args, **kwargs)
  return named_jit


def _compiled(programs_: dict, steps_per_epoch: int) -> Compiled:
  return Compiled(programs_.get("init"), programs_.get("init_memory"), programs_["new_state"],
                  programs_["order"], programs_["chunk"], programs_["evaluate"],
                  programs_.get("consolidate"), steps_per_epoch,
                  programs_.get("evaluate_validation"), programs_.get("keys"),
                  programs_.get("fold"))

