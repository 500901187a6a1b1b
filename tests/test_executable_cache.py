"""experiments.executable_cache (the command lines' `compile_fn`): a run's compiled programs saved, loaded by the next run (nothing
traced or compiled, the same numbers), compiled again when unreadable.

The test session has JAX's persistent compilation cache on (conftest): a program compiled by an
earlier test comes from it, and such a compile phase saves nothing. The runs here use a network
no other test builds (hidden width 19), so their first compile is a fresh one.
"""

import dataclasses

import jax
import numpy as np
import pytest

from ewc_jax import continual, heads
from experiments import executable_cache
from tests.test_continual import CFG, T, synthetic_tasks

UNIQUE = dataclasses.replace(CFG, hidden=(19,), seed=5)


def run(cfg, folder, key="k"):
  net = heads.task_incremental(T, 2, hidden=cfg.hidden)
  cached = executable_cache.Cached(executable_cache.Folder(folder), key)
  traced = []

  def listener(name, secs, **_):
    if "jaxpr_trace_duration" in name or "backend_compile" in name:
      traced.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    result = continual.run(cfg, net, synthetic_tasks(120, 0), synthetic_tasks(60, 1),
                           compile_fn=cached)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return result, traced


def same(a, b):
  np.testing.assert_array_equal(a.acc_matrix, b.acc_matrix)
  assert a.curves == b.curves
  for u, v in zip(jax.tree.leaves((a.params, a.memory)), jax.tree.leaves((b.params, b.memory))):
    np.testing.assert_array_equal(u, v)


def test_saved_programs_are_loaded_untraced_and_give_the_same_run(tmp_path):
  first, traced_first = run(UNIQUE, tmp_path)
  assert traced_first and (tmp_path / "k.executables").is_file()
  second, traced_second = run(dataclasses.replace(UNIQUE, seed=6), tmp_path)  # seed: an input
  assert traced_second == []  # nothing traced, lowered or compiled
  reference, _ = run(dataclasses.replace(UNIQUE, seed=6), tmp_path / "none", key="other")
  same(second, reference)
  assert not np.array_equal(first.acc_matrix, second.acc_matrix) or first.curves != second.curves


def test_a_compile_served_by_the_persistent_cache_saves_nothing(tmp_path):
  """(Its serialisation would not run on CPU.) The same key in another store (the store's
  entry lost): the programs, named after the key, come from JAX's cache and no file is
  written."""
  cfg = dataclasses.replace(UNIQUE, hidden=(17,))
  run(cfg, tmp_path / "a")
  _, traced = run(cfg, tmp_path / "b")
  assert traced and not (tmp_path / "b" / "k.executables").exists()


def test_programs_of_a_new_key_are_compiled_afresh_and_saved(tmp_path):
  """A new key (e.g. after an edit of the code that leaves the programs as they were) names
  the programs anew, so JAX's cache does not serve them: they are compiled, saved, and the
  next run under that key loads them."""
  cfg = dataclasses.replace(UNIQUE, hidden=(23,))
  run(cfg, tmp_path / "a", key="old")
  _, traced = run(cfg, tmp_path / "b", key="new")
  assert traced and (tmp_path / "b" / "new.executables").is_file()
  _, traced_again = run(cfg, tmp_path / "b", key="new")
  assert traced_again == []


def test_an_unreadable_entry_is_compiled_again(tmp_path):
  cfg = dataclasses.replace(UNIQUE, hidden=(21,))
  (tmp_path / "k.executables").write_bytes(b"not a pickle")
  result, traced = run(cfg, tmp_path)
  assert traced
  reference, _ = run(cfg, tmp_path / "none", key="other")
  same(result, reference)
  # A fresh compile replaced the entry with a readable one; one served by JAX's cache left it.
  entry = executable_cache.Folder(tmp_path).load("k", ("chunk",))
  assert (entry is None) == ((tmp_path / "k.executables").read_bytes() == b"not a pickle")


def test_keys_are_checked():
  store = executable_cache.Folder("/nonexistent")
  with pytest.raises(ValueError, match=r"`key` must be 1-200 characters"):
    store.load("../escape", ("chunk",))


def test_the_layout_is_part_of_the_key_and_the_programs_are_named_after_it():
  """The same key for one run and for a sweep's config axis: two entries; the programs lowered
  on a miss carry the digest of the whole key in their names."""

  class Recorder:
    def __init__(self):
      self.loads, self.saves = [], []

    def load(self, key, names):
      self.loads.append(key)

    def save(self, key, executables):
      self.saves.append(key)

  suffixes = []

  def lower(suffix):
    suffixes.append(suffix)
    return {}

  store = Recorder()
  cached = executable_cache.Cached(store, "k")
  for layout in ("", "configs4-config2"):
    cached(continual.Uncompiled((), layout, lower))
  assert store.loads == ["k", "k-configs4-config2"]
  assert store.saves in ([], store.loads)  # nothing compiled: no persistent-cache hit either
  assert len(set(suffixes)) == 2 and all(len(s) == 16 for s in suffixes)
