"""experiments.compile_cache: the key of a command-line run's compiled programs."""

import numpy as np
import pytest

from experiments import compile_cache
from tests.test_continual import synthetic_tasks


def test_the_command_lines_key_follows_every_part(tmp_path, monkeypatch):
  monkeypatch.setenv("EWC_JAX_CACHE_DIR", str(tmp_path))
  data = synthetic_tasks(120, 0)
  base = compile_cache.executables({"run": {"lam": 1.0}}, data)
  assert base.key == compile_cache.executables({"run": {"lam": 1.0}}, data).key
  assert base.store.folder == tmp_path / "executables"
  others = [compile_cache.executables({"run": {"lam": 2.0}}, data),
            compile_cache.executables({"run": {"lam": 1.0}}, synthetic_tasks(130, 0)),
            compile_cache.executables({"run": {"lam": 1.0},
                                       "mean": np.float32([0.5])}, data)]
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
  others.append(compile_cache.executables({"run": {"lam": 1.0}}, data))
  assert len({base.key, *(o.key for o in others)}) == 1 + len(others)
  with pytest.raises(TypeError, match="is not part of a compiled program's key"):
    compile_cache.executables({"f": object()}, data)


def test_the_class_groups_enter_the_key_where_they_shape_the_heads(tmp_path, monkeypatch):
  """Task/domain heads depend on the groups' sizes only (seeds with their own shuffled pairs
  share programs); class-incremental heads on which classes each task makes active."""
  import types  # pylint: disable=import-outside-toplevel
  from experiments import config  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("EWC_JAX_CACHE_DIR", str(tmp_path))
  data = synthetic_tasks(120, 0)
  keys = {}
  for scenario in ("task", "class"):
    c = config.make("split_mnist", scenario=scenario)
    for groups in (((0, 1), (2, 3)), ((3, 1), (0, 2))):
      built = types.SimpleNamespace(class_groups=groups)
      keys[scenario, groups] = compile_cache.run_executables(c, c.run, built, None, data,
                                                             data).key
  assert keys["task", ((0, 1), (2, 3))] == keys["task", ((3, 1), (0, 2))]
  assert keys["class", ((0, 1), (2, 3))] != keys["class", ((3, 1), (0, 2))]
