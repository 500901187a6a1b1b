"""The fast exact convolution path and the public plan (finding 2 of issue 14): per-example
squared conv-kernel gradients from unfolded patches equal ``vmap(grad)`` for strides, padding,
input/kernel dilation, NCHW layouts, 1-D and 3-D convolutions, bf16 compute; grouped
convolutions fall back, and ``fisher_plan`` says so."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewc_jax import fisher_diagonal, fisher_plan

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class MnistCNN(nn.Module):
  """The CNN of flax/examples/mnist (linen), narrowed; ``dtype`` = compute dtype."""
  dtype: object = None

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), dtype=self.dtype)(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(6, (3, 3), dtype=self.dtype)(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(16, dtype=self.dtype)(x))
    return nn.Dense(3, dtype=self.dtype)(x)


class ExoticConvs(nn.Module):
  """Strides, explicit asymmetric padding, kernel and input dilation, grouped, 1x1."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 1), padding=((1, 2), (0, 1)),
                        kernel_dilation=(1, 2))(x))
    x = nn.relu(nn.Conv(4, (2, 2), padding=((1, 0), (0, 1)), input_dilation=(2, 1))(x))
    x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", feature_group_count=2)(x))
    x = nn.relu(nn.Conv(5, (1, 1), use_bias=False)(x))
    x = nn.Conv(3, (3, 3), padding="CIRCULAR", strides=2)(x)
    return x.mean(axis=(1, 2))


def _nchw_fn(p, x):
  """A raw NCHW / OIHW convolution (PyTorch's layout) then a Dense."""
  h = jax.lax.conv_general_dilated(x, p["k"], (1, 2), ((1, 1), (2, 0)), rhs_dilation=(2, 1),
                                   dimension_numbers=("NCHW", "OIHW", "NCHW"))
  return jnp.tanh(h).reshape(x.shape[0], -1) @ p["w"]


def _conv1d_fn(p, x):
  h = jax.lax.conv_general_dilated(x, p["k"], (2,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
  return jnp.tanh(h).mean(axis=1) @ p["w"]


def _conv3d_fn(p, x):
  h = jax.lax.conv_general_dilated(x, p["k"], (1, 2, 1), "VALID",
                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  return jnp.tanh(h).mean(axis=(1, 2, 3)) @ p["w"]


def _case(name):
  rng = np.random.default_rng(0)
  f32 = lambda *s: (0.7 * rng.normal(size=s)).astype(np.float32)  # noqa: E731
  if name in ("mnist_cnn", "mnist_cnn_bf16", "exotic"):
    module = {"exotic": ExoticConvs()}.get(name) or MnistCNN(
        dtype=jnp.bfloat16 if name.endswith("bf16") else None)
    x = f32(7, 12, 12, 2)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x[:1])["params"]
    params = jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    return (lambda p, xb: module.apply({"params": p}, xb)), params, x
  if name == "nchw":
    return _nchw_fn, {"k": f32(4, 2, 3, 2), "w": f32(4 * 6 * 4, 3)}, f32(7, 2, 8, 7)
  if name == "conv1d":
    return _conv1d_fn, {"k": f32(3, 2, 4), "w": f32(4, 3)}, f32(7, 9, 2)
  return _conv3d_fn, {"k": f32(2, 3, 2, 2, 4), "w": f32(4, 3)}, f32(7, 4, 7, 3, 2)


FAST = {
    "mnist_cnn": {"['Conv_0']['kernel']": "conv", "['Conv_1']['kernel']": "conv",
                  "['Dense_0']['kernel']": "dense", "['Dense_1']['kernel']": "dense"},
    "exotic": {"['Conv_0']['kernel']": "conv", "['Conv_1']['kernel']": "conv",
               "['Conv_2']['kernel']": "conv",
               "['Conv_3']['kernel']": "conv", "['Conv_4']['kernel']": "conv"},
    "nchw": {"['k']": "conv", "['w']": "dense"},
    "conv1d": {"['k']": "conv", "['w']": "dense"},
    "conv3d": {"['k']": "conv", "['w']": "dense"},
}
FAST["mnist_cnn_bf16"] = FAST["mnist_cnn"]


@pytest.mark.parametrize("name", list(FAST))
def test_conv_fast_path_equals_vmap_grad(name):
  fn, params, x = _case(name)
  plan = fisher_plan(fn, params, x)
  assert {leaf.path: leaf.method for leaf in plan
          if leaf.method in ("conv", "dense")} == FAST[name]
  assert "vmap" not in {leaf.method for leaf in plan}
  y = np.arange(x.shape[0]) % 3
  run = jax.jit(lambda p: {(m, k): fisher_diagonal(fn, p, x, y, batch_size=3, method=m, kind=k)
                           for m in ("auto", "vmap") for k in ("empirical", "true")},
                compiler_options=_FAST_COMPILE)
  got = run(params)
  # bf16 compute: vmap(grad) rounds each per-example gradient to bf16 before squaring, the fast
  # path squares float32 products of bf16 activations and output gradients (more exact).
  rtol = 3e-2 if name.endswith("bf16") else 2e-5
  for kind in ("empirical", "true"):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got["auto", kind])[0],
                            jax.tree.leaves(got["vmap", kind])):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      assert np.max(b) > 0
      np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-3 * np.max(b),
                                 err_msg=f"{name} {kind} {jax.tree_util.keystr(path)}")


def test_plan_explains_every_fallback():
  fn, params, x = _case("exotic")
  plan = {leaf.path: leaf for leaf in fisher_plan(fn, params, x)}
  grouped = plan["['Conv_2']['kernel']"]
  assert grouped.method == "conv" and "2 groups" in grouped.reason
  bias = plan["['Conv_0']['bias']"]
  assert bias.method == "elementwise" and "add" in bias.reason
  assert all(leaf.reason for leaf in plan.values())
  assert {leaf.method for leaf in fisher_plan(fn, params, x, method="vmap")} == {"vmap"}
  shared = fisher_plan(lambda p, xb: jnp.tanh(xb @ p["w"]) @ p["w"].T, {"w": np.ones((3, 3))},
                       np.ones((2, 3)))
  assert shared[0].method == "tied" and "tied" in shared[0].reason
  inside_scan = fisher_plan(
      lambda p, xb: jax.lax.scan(lambda h, _: (jnp.tanh(h @ p["w"]), None), xb, None, 2)[0],
      {"w": np.ones((3, 3))}, np.ones((2, 3)))
  assert inside_scan[0].method == "vmap" and "scan" in inside_scan[0].reason
  masked = fisher_plan(fn, params, x, leaf_mask=lambda p: {k: k != "Conv_4" for k in p})
  assert {leaf.method for leaf in masked if "Conv_4" in leaf.path} == {"masked"}


def test_bf16_compute_keeps_the_fast_paths_and_approximates_float32():
  fn32, params, x = _case("mnist_cnn")
  fn16, _, _ = _case("mnist_cnn_bf16")
  assert [l.method for l in fisher_plan(fn16, params, x)] == [
      l.method for l in fisher_plan(fn32, params, x)]
  assert any("dtype cast" in l.reason for l in fisher_plan(fn16, params, x))
  y = np.arange(x.shape[0]) % 3
  f32 = fisher_diagonal(fn32, params, x, y)
  f16 = fisher_diagonal(fn16, params, x, y)
  for a, b in zip(jax.tree.leaves(f16), jax.tree.leaves(f32)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, rtol=0.1, atol=0.02 * float(np.max(b)))
