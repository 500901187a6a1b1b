"""The continual-learning protocol: train task after task, evaluate, consolidate.

:func:`run` is the one loop every benchmark shares. It compiles each piece once, ahead of time
(epoch order, a chunk of train steps, evaluation of every task, consolidation = Fisher + memory
update), so the compile time is measured on its own and no task triggers a recompile: task data
are padded to one shape and the task index is an array.

Any backbone (``Config.backbone``, or your own Flax linen module: :mod:`ewc_jax.backbones`) runs
through the same programs. Its model state (BatchNorm's ``batch_stats``) is part of the train
state: updated by every train step (train mode, batch statistics), read by evaluation and the
Fisher (evaluation mode, running averages), saved in checkpoints, vmapped and sharded in sweeps
like the parameters. It is one copy shared by every task: the running averages keep following
the newest task's data, for the old tasks too, and EWC (which consolidates parameters only) does
not hold them. Dropout keys: step s of epoch e of task t draws from
``fold_in(fold_in(fold_in(k_dropout, t), e), s)`` with ``k_dropout = fold_in(k_order,
DROPOUT_STREAM)`` (``k_order`` is otherwise only folded with task indices), so a resumed run
draws the same masks.

The package, one concept per module: :mod:`~ewc_jax.continual.config` (the settings, checked at
the boundary), :mod:`~ewc_jax.continual.network`, :mod:`~ewc_jax.continual.task_data` (padded
task sequences; :mod:`~ewc_jax.continual.holdout`, the validation split),
:mod:`~ewc_jax.continual.step` (optimizer, loss, train and evaluation steps),
:mod:`~ewc_jax.continual.programs` (jit / vmap / sharding, ahead-of-time compilation through
a ``compile_fn`` hook),
:mod:`~ewc_jax.continual.loop` (:func:`run`), :mod:`~ewc_jax.continual.state` and
:mod:`~ewc_jax.continual.finite` (finiteness checks).
"""

from ewc_jax.continual.config import (ALGOS, BACKBONES, HYPER_FIELDS, PENALTIES, SWEEPABLE,
                                      Config, hyper_of, make_algorithm, program_arguments)
from ewc_jax.continual.finite import NumericalError, check_finite, divergence_record, new_divergences
from ewc_jax.continual.loop import run
from ewc_jax.continual.network import make_network
from ewc_jax.continual.programs import (DROPOUT_STREAM, Compiled, Compiler, ConsolidateInputs,
                                        Programs, Uncompiled, compile_lowered, compile_programs,
                                        fresh_state, map_configs, once_per_layout, programs,
                                        seed_keys, sweep_jit)
from ewc_jax.continual.state import Result, RunState, abstract_run_state, describe_position
from ewc_jax.continual.task_data import TaskData

__all__ = [
    "ALGOS", "BACKBONES", "Compiled", "Compiler", "Config", "ConsolidateInputs", "DROPOUT_STREAM",
    "HYPER_FIELDS", "NumericalError", "PENALTIES", "Programs", "Result", "RunState",
    "SWEEPABLE", "TaskData", "Uncompiled", "abstract_run_state", "check_finite",
    "compile_lowered", "compile_programs",
    "describe_position", "divergence_record", "fresh_state", "hyper_of", "make_algorithm",
    "make_network", "map_configs", "new_divergences", "once_per_layout", "program_arguments",
    "programs", "run", "seed_keys", "sweep_jit",
]
