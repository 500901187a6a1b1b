import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewc_jax import fisher, heads


@pytest.fixture(scope="module")
def net_and_params():
  net = heads.task_incremental(num_tasks=3, classes_per_task=2, hidden=(8, 8))
  params = heads.init_params(net, jax.random.key(0), jnp.ones((1, 12)))
  return net, params


def test_param_tree_has_backbone_and_one_head_per_task(net_and_params):
  net, params = net_and_params
  assert set(params) == {"backbone", "heads"}
  assert list(params["heads"]) == ["task_1", "task_2", "task_3"] == net.task_names
  assert params["heads"]["task_2"]["kernel"].shape == (8, 2)
  # Heads start different (independent keys).
  assert not np.allclose(params["heads"]["task_1"]["kernel"], params["heads"]["task_2"]["kernel"])


def test_array_task_index_selects_that_head(net_and_params):
  net, params = net_and_params
  x = jax.random.normal(jax.random.key(1), (5, 12))
  feats = heads.features(net, params["backbone"], x)
  logits = jax.jit(lambda p, x, t: heads.logits(net, p, x, t))
  for t, name in enumerate(net.task_names):
    expected = feats @ params["heads"][name]["kernel"] + params["heads"][name]["bias"]
    np.testing.assert_allclose(logits(params, x, jnp.int32(t)), expected, rtol=1e-5, atol=1e-6)
  assert logits._cache_size() == 1  # one program for every task


def test_backbone_logits_fn_weighs_backbone_only(net_and_params):
  net, params = net_and_params
  x = jax.random.normal(jax.random.key(2), (6, 12))
  y = jnp.array([0, 1, 0, 1, 1, 0])
  fn = heads.backbone_logits_fn(net, params["heads"], 1)
  imp = fisher.fisher_diagonal(fn, params["backbone"], x, y, batch_size=4)
  assert jax.tree.structure(imp) == jax.tree.structure(params["backbone"])


@pytest.mark.parametrize("args", [(0, 2), (3, 0)])
def test_bad_sizes(args):
  with pytest.raises(ValueError, match="num_tasks|classes_per_task"):
    heads.task_incremental(*args)
