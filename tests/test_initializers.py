"""ewc_jax.initializers and Config.init: PyTorch's default initialisation in the runner."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewc_jax import continual, errors, heads, initializers
from tests.test_continual import CFG, T, synthetic_tasks


def test_kernels_and_biases_are_uniform_within_one_over_sqrt_fan_in():
  net = heads.make_network("task", [[0, 1]] * 2, backbone="cnn")
  params, _ = heads.init_variables(net, jax.random.key(0), jnp.ones((1, 28, 28, 1)))
  new = initializers.pytorch_default(jax.random.key(1), params)
  flat = dict(jax.tree_util.tree_flatten_with_path(new)[0])
  kernels = {jax.tree_util.keystr(p[:-1]): v for p, v in flat.items() if p[-1].key == "kernel"}
  assert len(kernels) == 3 + 2  # 2 convolutions + 1 dense, 2 heads
  for path, leaf in flat.items():
    parent = jax.tree_util.keystr(path[:-1])
    bound = 1 / np.sqrt(np.prod(kernels[parent].shape[:-1]))
    values = np.asarray(leaf)
    assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound, path
    # uniform on [-b, b]: variance b²/3 (to sampling error)
    if values.size > 1000:
      np.testing.assert_allclose(values.var(), bound ** 2 / 3, rtol=0.1)
  assert not np.array_equal(new["heads"]["task_1"]["bias"], new["heads"]["task_2"]["bias"])


def test_other_leaves_are_kept_and_flax_is_the_identity():
  params = {"bn": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}, "d": {"kernel": jnp.ones((2, 3))}}
  new = initializers.pytorch_default(jax.random.key(0), params)
  np.testing.assert_array_equal(new["bn"]["scale"], 1.0)  # no sibling kernel: kept
  np.testing.assert_array_equal(new["bn"]["bias"], 0.0)
  assert initializers.apply("flax", jax.random.key(0), params) is params
  with pytest.raises(ValueError, match="`init` must be one of flax, pytorch"):
    initializers.apply("xavier", jax.random.key(0), params)


def test_the_runner_starts_from_the_chosen_initialisation():
  cfg = dataclasses.replace(CFG, epochs=1)
  net = heads.task_incremental(T, 2, hidden=cfg.hidden)
  train, test = synthetic_tasks(120, 0), synthetic_tasks(60, 1)
  runs = {init: continual.run(dataclasses.replace(cfg, init=init), net, train, test)
          for init in ("flax", "pytorch")}
  assert runs["flax"].curves != runs["pytorch"].curves
  assert continual.run(cfg, net, train, test).curves == runs["flax"].curves  # default: flax
  with pytest.raises(errors.SettingError, match=r"`init`='he' is invalid: expected one of flax, "
                     "pytorch"):
    dataclasses.replace(cfg, init="he").validate()
