"""ewc_jax.continual.programs: the ``compile_fn`` hook of ``continual.run`` (what a
:class:`~ewc_jax.continual.programs.Compiler` is handed, and a run through one gives the
default's numbers)."""

import dataclasses

import numpy as np
import pytest

from ewc_jax import continual, heads
from tests.test_continual import CFG, T, synthetic_tasks

CFG1 = dataclasses.replace(CFG, epochs=1)


def _run(compile_fn, **kw):
  net = heads.task_incremental(T, 2, hidden=CFG1.hidden)
  return continual.run(CFG1, net, synthetic_tasks(120, 0), synthetic_tasks(60, 1),
                       compile_fn=compile_fn, **kw)


def test_a_compiler_gets_names_layout_and_lower_and_the_run_is_the_default_one():
  seen = []

  def compiler(programs):
    seen.append(programs)
    return continual.compile_lowered(programs.lower("mine"))

  np.testing.assert_array_equal(_run(compiler).acc_matrix, _run(None).acc_matrix)
  (programs,) = seen
  assert programs.layout == ""
  assert set(programs.names) == {"order", "new_state", "chunk", "evaluate", "init",
                                 "init_memory", "consolidate", "keys", "fold"}
  lowered = programs.lower("mine")
  assert set(lowered) == set(programs.names)
  assert "chunk_mine" in lowered["chunk"].as_text()


def test_a_sweep_names_its_config_axis_in_the_layout():
  layouts = []

  def compiler(programs):
    layouts.append(programs.layout)
    return continual.compile_lowered(programs.lower(None))

  hyper = continual.hyper_of(CFG1)
  hyper = type(hyper)(*(np.full(3, v, np.float32) for v in hyper))
  _run(compiler, hyper=hyper, seeds=[0, 1, 2])
  assert layouts == ["configs3"]


def test_a_compiler_that_leaves_a_program_out_is_refused():
  def compiler(programs):
    return {name: None for name in programs.names if name != "chunk"}

  with pytest.raises(ValueError, match="`compile_fn` returned no program named chunk"):
    _run(compiler)


def test_a_compiler_that_returns_no_mapping_is_refused():
  with pytest.raises(TypeError, match="`compile_fn` must return a mapping"):
    _run(lambda programs: None)
