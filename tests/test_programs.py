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


class _Stop(Exception):
  """Ends a run at its compiler (the layout is all a test reads)."""


def test_a_sweep_names_its_config_axis_in_the_layout():
  layouts = []

  def compiler(programs):
    layouts.append(programs.layout)
    raise _Stop

  hyper = continual.hyper_of(CFG1)
  hyper = type(hyper)(*(np.full(3, v, np.float32) for v in hyper))
  for vectorize in (True, False):
    with pytest.raises(_Stop):
      _run(compiler, hyper=hyper, seeds=[0, 1, 2], vectorize=vectorize)
  assert layouts == ["configs3", "mapped3"]


def test_map_configs_is_vmap_on_the_unbatched_operations():
  """map_configs takes vmap's in_axes (a prefix of the arguments: 0 mapped, None shared) and
  stacks the outputs on axis 0; an axis other than 0 is refused."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  f = lambda tree, w: {"y": tree["x"] @ w + tree["b"], "n": jnp.sum(w)}  # noqa: E731
  tree = {"x": jnp.arange(24.0).reshape(3, 2, 4), "b": jnp.arange(3.0)[:, None]}
  w = jnp.ones((4, 5))
  got = jax.jit(continual.map_configs(f, (0, None)))(tree, w)
  want = jax.vmap(f, in_axes=(0, None))(tree, w)
  assert jax.tree.map(np.shape, got) == jax.tree.map(np.shape, want)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert continual.map_configs(f, (0, None)).__name__ == "<lambda>"
  with pytest.raises(ValueError, match="axis 0 only"):
    continual.map_configs(f, (1, None))(tree, w)


def test_once_per_layout_compiles_each_layout_once_and_serves_the_names_asked():
  calls = []

  def compiler(p):
    calls.append((p.layout, p.names))
    return {name: f"{p.layout}:{name}" for name in p.names}

  once = continual.once_per_layout(compiler)
  lower = lambda suffix: {}  # noqa: E731  (never called by this compiler)
  full = continual.Uncompiled(("chunk", "init", "order"), "mapped2", lower)
  assert once(full) == {"chunk": "mapped2:chunk", "init": "mapped2:init",
                        "order": "mapped2:order"}
  assert once(full._replace(names=("chunk", "order"))) == {"chunk": "mapped2:chunk",
                                                           "order": "mapped2:order"}
  assert once(full._replace(layout="mapped1")) == {"chunk": "mapped1:chunk",
                                                   "init": "mapped1:init",
                                                   "order": "mapped1:order"}
  once(full._replace(names=("chunk", "evaluate")))  # a name it lacks: compiled again
  assert [c[0] for c in calls] == ["mapped2", "mapped1", "mapped2"]


def test_a_compiler_that_leaves_a_program_out_is_refused():
  def compiler(programs):
    return {name: None for name in programs.names if name != "chunk"}

  with pytest.raises(ValueError, match="`compile_fn` returned no program named chunk"):
    _run(compiler)


def test_a_compiler_that_returns_no_mapping_is_refused():
  with pytest.raises(TypeError, match="`compile_fn` must return a mapping"):
    _run(lambda programs: None)
