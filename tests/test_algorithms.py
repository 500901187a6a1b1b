"""Tests for ewc_jax.algorithms: the memory built by ``consolidate`` gives exactly the penalties
of ewc_jax.penalty over the consolidated anchors (every EWC variant and exponent path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewc_jax import algorithms
from ewc_jax.algorithms import Hyper
from ewc_jax.penalty import Anchor, clarena_loss, ewc_loss, seed_parity_loss

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SHAPES = {"fc1": {"kernel": (4, 3), "bias": (3,)}, "fc2": {"kernel": (3, 2), "bias": (2,)}}


def run(fn, *args):
  return jax.jit(fn, compiler_options=_FAST_COMPILE)(*args)


def _tree(rng, positive=False):
  def leaf(s):
    v = rng.uniform(0.0, 1.0, s) if positive else rng.normal(size=s)
    return np.asarray(v, np.float32)
  return jax.tree.map(leaf, SHAPES, is_leaf=lambda x: isinstance(x, tuple) and
                      all(isinstance(d, int) for d in x))


def _setup(seed=0):
  rng = np.random.default_rng(seed)
  backbone = _tree(rng)
  anchors = [Anchor(_tree(rng), _tree(rng, positive=True)) for _ in range(2)]
  return backbone, anchors


def _consolidated(algo, anchors, hyper, num_tasks=4):
  """``init`` with num_tasks slots (one unused here), then ``consolidate`` after tasks 0 and 1."""
  memory = algo.init(anchors[0].params, num_tasks)
  for t, a in enumerate(anchors):
    memory = algo.consolidate(memory, a.params, a.importance, t, hyper)
  return memory


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol)


def test_finetune_has_no_penalty_and_no_memory():
  backbone, anchors = _setup()
  algo = algorithms.finetune()
  assert algo.name == "finetune" and algo.importance is None
  memory = algo.init(backbone, 4)
  assert algo.consolidate(memory, anchors[0].params, anchors[0].importance, 0, Hyper()) == memory
  value, grad = run(jax.value_and_grad(lambda q: algo.penalty(q, memory, Hyper(lam=5.0), 1)),
                    backbone)
  assert float(value) == 0.0
  for leaf in jax.tree.leaves(grad):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


@pytest.mark.parametrize("variant", ["p2_merged", "p3_stacked", "p_traced"])
def test_ewc_standard_penalty_equals_ewc_loss(variant):
  backbone, anchors = _setup(1)
  if variant == "p2_merged":
    algo, ps = algorithms.ewc(p=2.0), (2.0,)
  elif variant == "p3_stacked":
    algo, ps = algorithms.ewc(p=3.0), (3.0,)
  else:
    algo, ps = algorithms.ewc(p=None), (2.0, 3.0, 1.5)   # p read from hyper.p at run time
  assert algo.importance == "fisher" and algo.name == "ewc"
  lam = 0.7
  def compute(q, p, task_index):
    hyper = Hyper(lam=jnp.float32(lam), p=p)
    memory = _consolidated(algo, anchors, hyper)
    empty = algo.init(q, 4)
    pen = lambda w, m: algo.penalty(w, m, hyper, task_index)  # noqa: E731
    ref = lambda w: ewc_loss(w, anchors, lam=lam, p=p)  # noqa: E731
    return {"algo": jax.value_and_grad(pen)(q, memory), "ref": jax.value_and_grad(ref)(q),
            "empty": pen(q, empty), "at_anchor": pen(anchors[1].params,
                                                     _consolidated(algo, anchors[1:], hyper))}
  f = jax.jit(compute, compiler_options=_FAST_COMPILE, static_argnums=()
              if variant == "p_traced" else (1,))
  for p in ps:
    got = f(backbone, p, 2)
    np.testing.assert_allclose(float(got["algo"][0]), float(got["ref"][0]), rtol=1e-5)
    assert_trees_close(got["algo"][1], got["ref"][1])
    # And against float64 numpy, so that a shared error in both could not hide.
    want = 0.5 * lam * sum(
        np.sum(np.asarray(f_, np.float64) * np.abs(np.asarray(t, np.float64) - r) ** p)
        for a in anchors for t, r, f_ in zip(jax.tree.leaves(backbone), jax.tree.leaves(a.params),
                                             jax.tree.leaves(a.importance)))
    np.testing.assert_allclose(float(got["algo"][0]), want, rtol=1e-5)
    assert float(got["empty"]) == 0.0
    assert abs(float(got["at_anchor"])) < 1e-6


@pytest.mark.parametrize("p", [2.0, 1.0, None])
def test_ewc_seed_penalty_equals_seed_parity_loss(p):
  backbone, anchors = _setup(2)
  algo = algorithms.ewc("seed", p=p)
  assert algo.name == "ewc_seed"
  p_eff = 1.0 if p is None else p
  def compute(q, task_index, hyper_p):
    hyper = Hyper(lam=0.9, p=hyper_p)   # traced; hyper.p only matters when p is None
    memory = _consolidated(algo, anchors, hyper)
    return (jax.value_and_grad(lambda w: algo.penalty(w, memory, hyper, task_index))(q),
            [jax.value_and_grad(lambda w: seed_parity_loss(w, anchors, factor=0.9, p=p_eff,  # noqa: B023
                                                           task_id=t))(q) for t in (1, 2, 3)])
  f = jax.jit(compute, compiler_options=_FAST_COMPILE)
  for task_index in (0, 2):      # current task id 1 (no division) and 3 (divide by 3)
    (value, grad), refs = f(backbone, task_index, 1.0 if p is None else 7.0)
    ref_value, ref_grad = refs[task_index]
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    assert_trees_close(grad, ref_grad)
  np.testing.assert_allclose(float(refs[2][0]), float(refs[0][0]) / 3, rtol=1e-6)


def test_ewc_clarena_penalty_equals_clarena_loss():
  backbone, anchors = _setup(3)
  algo = algorithms.ewc("clarena")
  assert algo.name == "ewc_clarena"
  hyper = Hyper(lam=2.5, p=3.0)   # p is ignored (2)
  def compute(q):
    memory = _consolidated(algo, anchors, hyper)
    return (jax.value_and_grad(lambda w: algo.penalty(w, memory, hyper, 2))(q),
            jax.value_and_grad(lambda w: clarena_loss(w, anchors, factor=2.5))(q))
  (value, grad), (ref_value, ref_grad) = run(compute, backbone)
  np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
  assert_trees_close(grad, ref_grad)


def test_consolidate_under_jit_with_traced_task_index():
  """As the continual runner calls it: jitted, task index traced."""
  backbone, anchors = _setup(4)
  algo = algorithms.ewc(p=3.0)
  consolidate = jax.jit(algo.consolidate, compiler_options=_FAST_COMPILE)
  memory = algo.init(backbone, 4)
  for t, a in enumerate(anchors):
    memory = consolidate(memory, a.params, a.importance, jnp.int32(t), Hyper())
  for k, a in enumerate(anchors):
    assert_trees_close(jax.tree.map(lambda x: x[k], memory.anchors.params), a.params, atol=0)
    assert_trees_close(jax.tree.map(lambda x: x[k], memory.anchors.importance), a.importance,
                       atol=0)
  for leaf in jax.tree.leaves(jax.tree.map(lambda x: x[2], memory.anchors.importance)):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)   # the unused slot
  assert_trees_close(memory.merged.weight,
                     jax.tree.map(lambda a, b: a + b, anchors[0].importance, anchors[1].importance))


def test_ewc_merged_and_online_ewc():
  backbone, anchors = _setup(5)
  merged_algo, online = algorithms.ewc_merged(), algorithms.online_ewc(p=2.0)
  gamma, lam = 0.6, 1.7
  def compute(q):
    hyper = Hyper(lam=lam, gamma=gamma)
    pen_merged = lambda w: merged_algo.penalty(  # noqa: E731
        w, _consolidated(merged_algo, anchors, hyper), hyper, 2)
    pen_online = lambda w: online.penalty(w, _consolidated(online, anchors, hyper), hyper, 2)  # noqa: E731
    # Online EWC: one anchor θ*_2 with importance γ F_1 + F_2 (the decay applied once).
    decayed = Anchor(anchors[1].params, jax.tree.map(lambda f1, f2: gamma * f1 + f2,
                                                     anchors[0].importance,
                                                     anchors[1].importance))
    return {"merged": jax.value_and_grad(pen_merged)(q),
            "ewc": jax.value_and_grad(lambda w: ewc_loss(w, anchors, lam=lam))(q),
            "online": jax.value_and_grad(pen_online)(q),
            "online_ref": jax.value_and_grad(lambda w: ewc_loss(w, [decayed], lam=lam))(q)}
  got = run(compute, backbone)
  for name, ref in (("merged", "ewc"), ("online", "online_ref")):
    np.testing.assert_allclose(float(got[name][0]), float(got[ref][0]), rtol=1e-5)
    assert_trees_close(got[name][1], got[ref][1])
  assert abs(float(got["online"][0]) - float(got["ewc"][0])) > 1e-3 * float(got["ewc"][0])
  with pytest.raises(ValueError, match="`p`=3"):
    algorithms.ewc_merged(p=3.0)


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="`penalty`='quadratic'"):
    algorithms.ewc("quadratic")
  with pytest.raises(ValueError, match="`algo`='si'"):
    algorithms.make("si")
  with pytest.raises(ValueError, match="penalty"):
    algorithms.make("online_ewc", penalty="seed")
