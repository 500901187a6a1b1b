"""Backbones by name (ewc_jax.backbones), their model state (BatchNorm) and a user's own module.

Tiny image tasks (tests.runs.image_tasks): 8x8x3 uint8 images, 3 binary tasks. The ResNet-18's
BatchNorm is checked here from its initial variables; its whole run (conftest's ``resnet18_run``)
serves the extended compile-count and resume tests.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge
from jax import lax

from ewc_jax import backbones, checkpoint, continual, fisher, heads
from ewc_jax.continual import step as step_lib
from tests.runs import T, image_tasks

def abstract_variables(net, shape):
  """``(params, model_state)`` of ``net`` on ``shape`` inputs as shapes (nothing is computed)."""
  return jax.eval_shape(lambda: heads.init_variables(net, jax.random.key(0),
                                                     jnp.ones((1,) + shape)))


# ------------------------------------------------------------------------------------------------
# The registry.

def test_names_and_unknown_names_and_options_are_refused_naming_them():
  assert backbones.NAMES == ("mlp", "cnn", "resnet18", "resnet18_full")
  with pytest.raises(ValueError, match=r"`backbone` must be one of mlp, cnn, resnet18, "
                                       r"resnet18_full, but got backbone='vgg'"):
    backbones.make("vgg")
  with pytest.raises(ValueError, match=r"`width` is not an option of backbone='mlp': expected "
                                       "hidden"):
    backbones.make("mlp", width=3)
  with pytest.raises(ValueError, match=r"`width`=0 is invalid"):
    backbones.make("resnet18", width=0)
  with pytest.raises(ValueError, match="`backbone` must be one of"):
    heads.make_network("task", [[0, 1]], backbone=3)


@pytest.mark.parametrize("field,value,needle", [
    ("backbone", "vgg", "`backbone`='vgg' is invalid: expected one of mlp, cnn, resnet18"),
    ("width", 8, "`width`=8 is invalid with `backbone`='mlp'"),
    ("width", 0, "`width`=0 is invalid: expected an integer >= 1")])
def test_config_refuses_bad_backbone_settings(field, value, needle):
  cfg = continual.Config(backbone="resnet18" if value == 0 else "mlp")
  with pytest.raises(ValueError, match=needle):
    dataclasses.replace(cfg, **{field: value}).validate()


@pytest.mark.parametrize("name,shape,classes,want,state,feats", [
    # flax/examples/mnist's CNN: 320 + 18,496 + 803,072 + a 10-way head of 2,570.
    ("cnn", (28, 28, 1), 10, 824_458, 0, 256),
    # SlimResNet18 (GEM / Mammoth / Avalanche, nf=20), conv + BatchNorm weights + 10-way head:
    # stem 540 + 40, stages 14,560 + 51,600 + 205,600 + 820,800, head 1,610.
    ("resnet18", (32, 32, 3), 10, 1_094_750, 3_000, 160),
    # The CIFAR ResNet-18 (kuangliu/pytorch-cifar, nf=64): 11,173,962 with a 10-way head.
    ("resnet18_full", (32, 32, 3), 10, 11_173_962, 9_600, 512),
    ("mlp", (28, 28, 1), 2, 784 * 400 + 400 + 400 * 400 + 400 + 400 * 2 + 2, 0, 400)])
def test_parameter_counts_and_feature_sizes(name, shape, classes, want, state, feats):
  net = heads.make_network("task", [list(range(classes))], backbone=name)
  params, model_state = abstract_variables(net, shape)
  assert fisher.num_parameters(params) == want
  assert fisher.num_parameters(model_state) == state  # BatchNorm's running means and variances
  out = jax.eval_shape(lambda p, s: heads.features(net, p["backbone"], jnp.ones((2,) + shape), s),
                       params, model_state)
  assert out.shape == (2, feats)


def test_input_shapes_images_flat_and_grayscale():
  x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1))
  flat = x.reshape(3, 64)
  cnn = backbones.make("cnn")
  v = cnn.init(jax.random.key(1), x)
  want = cnn.apply(v, x)
  np.testing.assert_array_equal(cnn.apply(v, x[..., 0]), want)   # [B, H, W] gains a channel
  np.testing.assert_array_equal(backbones.make("cnn", input_shape=(8, 8, 1)).apply(v, flat), want)
  with pytest.raises(ValueError, match=r"takes images \[B, H, W, C\].*`input_shape`"):
    cnn.apply(v, flat)
  with pytest.raises(ValueError, match=r"`input_shape`=\(4, 4, 2\) is invalid.*H·W·C = 64"):
    backbones.make("cnn", input_shape=(4, 4, 2)).apply(v, x.reshape(3, 8, 8))
  mlp = backbones.make("mlp", hidden=(5,))
  w = mlp.init(jax.random.key(2), flat)
  np.testing.assert_array_equal(mlp.apply(w, x), mlp.apply(w, flat))  # the MLP flattens


@pytest.mark.parametrize("size,kernel,stride,padding", [
    (8, 3, 1, "SAME"), (9, 3, 2, "SAME"), (8, 3, 2, ((1, 1), (1, 1))), (8, 1, 2, ((0, 0), (0, 0))),
    (7, 3, 1, "VALID"), (9, 1, 2, "VALID")])
@pytest.mark.parametrize("kernel_grad", ["conv", "unfold"])
def test_loop_conv_equals_lax_conv_in_value_and_gradients(size, kernel, stride, padding,
                                                          kernel_grad):
  """The built-in backbones' train-mode convolution: the same values and gradients as
  ``lax.conv_general_dilated`` (its kernel gradient is computed another way, as a convolution
  or as one matmul of the unfolded input: see its module)."""
  x = jax.random.normal(jax.random.key(0), (5, size, size, 4))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 4, 6))
  dims = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

  def loss(conv):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(
        conv(x, w, (stride, stride), padding, dimension_numbers=dims))), (0, 1)))
  ours = functools.partial(backbones.loop_conv, kernel_grad=kernel_grad)
  (want, want_grads), (got, got_grads) = (loss(c)(x, w) for c in (lax.conv_general_dilated,
                                                                  ours))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for a, b in zip(got_grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


# ------------------------------------------------------------------------------------------------
# Model state: train mode updates the running statistics, evaluation and the Fisher read them.

def test_train_mode_updates_batch_stats_and_eval_mode_reads_them():
  """The ResNet-18's BatchNorm, from its initial variables (no training run needed: the whole
  run with resume and compile count is ``extended``, tests/test_checkpoint.py and
  tests/test_continual.py)."""
  net = heads.make_network("task", [[0, 1]] * T, backbone="resnet18")
  rows = step_lib.scale_pixels(jnp.asarray(image_tasks(32, 0).inputs[0, :32]))
  x, other = rows[:16], jnp.concatenate([rows[:3], rows[19:]])  # same first 3, other batch
  params, state = jax.jit(lambda x: heads.init_variables(net, jax.random.key(3), x))(x[:1])
  assert set(state) == {"batch_stats"}
  train_feats = jax.jit(lambda s, x: heads.train_features(net, params["backbone"], s, x))
  _, new = train_feats(state, x)
  moved = [bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(new))]
  assert all(moved)  # every running mean and variance moved towards this batch's statistics
  stem = new["batch_stats"]["BatchNorm_0"]
  # momentum 0.9 (PyTorch's 0.1): new mean = 0.9 * old + 0.1 * batch mean of the stem conv
  conv = nn.Conv(20, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
  batch_mean = conv.apply({"params": params["backbone"]["Conv_0"]}, x).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(stem["mean"], 0.9 * state["batch_stats"]["BatchNorm_0"]["mean"]
                             + 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
  # Evaluation: the running statistics, so an example's features do not depend on its batch ...
  feats = jax.jit(lambda s, x: heads.features(net, params["backbone"], x, s))
  np.testing.assert_allclose(feats(new, x)[:3], feats(new, other)[:3], rtol=1e-5, atol=1e-6)
  # ... while in train mode they do (batch statistics).
  a = train_feats(new, x)[0][:3]
  b = train_feats(new, other)[0][:3]
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


# ------------------------------------------------------------------------------------------------
# Your own module with BatchNorm and dropout: the Fisher, continual.run, checkpoints.

class UserNet(nn.Module):
  """A user's backbone: conv -> BatchNorm -> relu -> dropout -> global average pool."""
  rate: float = 0.3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(6, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.8)(x))
    x = nn.Dropout(self.rate, deterministic=not train)(x)
    return jnp.mean(x, axis=(1, 2))


USER_CFG = continual.Config(epochs=2, batch_size=16, lam=10.0, lr=1e-2, chunk_steps=2,
                            fisher_batch_size=16)


def test_fisher_of_the_runner_is_in_eval_mode_on_the_running_statistics():
  """The runner's consolidation weighs the parameters with BatchNorm on the given running
  statistics (evaluation mode), not on batch statistics (train mode)."""
  net = heads.make_network("task", [[0, 1]] * T, backbone=UserNet(0.0))
  data = image_tasks(16, 0)
  x, y = step_lib.scale_pixels(jnp.asarray(data.inputs[0])), jnp.asarray(data.labels[0])
  params, state = heads.init_variables(net, jax.random.key(0), x[:1])
  _, stats = heads.train_features(net, params["backbone"], state, x)  # running stats != init
  cfg = continual.Config(fisher_batch_size=8)
  algo = continual.make_algorithm(cfg)
  theta = heads.consolidated(net, params)
  consolidate = jax.jit(continual.programs(cfg, net, algo, data).consolidate)
  imp = {name: jax.tree.map(lambda a: a[0], consolidate(
      algo.init(theta, T), continual.ConsolidateInputs(
          params=params, model_state=s, data=data, task_index=jnp.int32(0),
          key=jax.random.key(1), hyper=continual.hyper_of(cfg))).anchors.importance)
         for name, s in (("init", state), ("stats", stats))}

  def weigh(logits_fn):
    return fisher.fisher_diagonal(logits_fn, theta, x, y, batch_size=8)
  def with_theta(th):
    return heads.with_consolidated(params, th)
  evaluation = weigh(lambda th, xb: heads.logits(net, with_theta(th), xb, 0, model_state=stats))
  training = weigh(lambda th, xb: heads.train_logits(net, with_theta(th), stats, xb, 0)[0])

  def close(a, b):
    return all(np.allclose(u, v, rtol=1e-4, atol=1e-7 * float(np.max(v)) + 1e-30)
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert close(imp["stats"], evaluation)
  assert not close(imp["stats"], training)
  assert not close(imp["stats"], imp["init"])  # it reads the statistics it is given


def user_run(rate=0.3, **kw):
  net = heads.make_network("task", [[0, 1]] * T, backbone=UserNet(rate))
  return net, continual.run(USER_CFG, net, image_tasks(40, 0), image_tasks(20, 1), **kw)


@pytest.fixture(scope="module")
def user_checkpointed(tmp_path_factory):
  folder = tmp_path_factory.mktemp("user") / "ck"
  states = {}

  def hook(rs, reason):
    if reason == "task":
      states[rs.task - 1] = rs.train_state.model_state
    ckpt(rs, reason)

  identity = {"benchmark": "user", **dataclasses.asdict(USER_CFG)}
  with checkpoint.RunCheckpointer(folder, identity, keep=100, every=1,
                                  chunk_steps=USER_CFG.chunk_steps) as ckpt:
    net, full = user_run(on_checkpoint=hook)
  return folder, identity, net, full, states


def test_user_module_with_batchnorm_and_dropout_runs(user_checkpointed):
  _, _, _, full, states = user_checkpointed
  assert set(full.model_state) == {"batch_stats"}
  _, no_dropout = user_run(rate=0.0)  # the dropout masks are really drawn in training
  assert no_dropout.curves[0]["loss_cls"] != full.curves[0]["loss_cls"]
  # One shared copy of the running statistics: they keep moving with every task ...
  after = [jax.tree.leaves(states[t]) for t in range(T)]
  assert all(not np.array_equal(a, b) for a, b in zip(after[0], after[2]))
  for a, b in zip(after[2], jax.tree.leaves(full.model_state)):
    np.testing.assert_array_equal(a, b)


def test_every_task_is_evaluated_with_the_latest_running_statistics(user_checkpointed):
  """The accuracy of task 1 after task 3 is that of the final parameters *and* the final
  running statistics, not those of the end of task 1 (one shared copy; EWC does not hold it)."""
  _, _, net, full, states = user_checkpointed
  test = image_tasks(20, 1)
  evaluate = jax.jit(lambda s, d: step_lib.evaluate(net, step_lib.scale_pixels, full.params, d, 2, s))
  np.testing.assert_allclose(evaluate(full.model_state, test), full.acc_matrix[2], atol=1e-7)
  x = step_lib.scale_pixels(jnp.asarray(test.inputs[0]))
  latest, first = (heads.logits(net, full.params, x, 0, model_state=s)
                   for s in (full.model_state, states[0]))
  assert float(jnp.max(jnp.abs(latest - first))) > 1e-4  # the statistics of task 1 are gone


def test_user_module_resume_with_dropout_and_batch_stats_is_exact(user_checkpointed):
  folder, identity, net, full, _ = user_checkpointed
  ckpt = checkpoint.RunCheckpointer(folder, identity)
  like = continual.abstract_run_state(USER_CFG, net, image_tasks(40, 0))
  mid = next(s for s in range(ckpt.latest_step() + 1)
             if (m := ckpt.read_meta(s))["task"] == 1 and m["step"] > 0)
  rs = ckpt.restore(like, step=mid)
  assert set(rs.train_state.model_state) == {"batch_stats"}
  _, resumed = user_run(resume=rs)
  np.testing.assert_array_equal(resumed.acc_matrix, full.acc_matrix)
  assert resumed.curves == full.curves
  for a, b in zip(jax.tree.leaves((resumed.params, resumed.model_state, resumed.memory)),
                  jax.tree.leaves((full.params, full.model_state, full.memory))):
    np.testing.assert_array_equal(a, b)
  ckpt.close()


# ------------------------------------------------------------------------------------------------
# An NNX module, through flax.nnx.bridge.to_linen.

class NNXNet(nnx.Module):
  """The user's backbone above, written in NNX: conv -> BatchNorm -> relu -> dropout -> pool."""

  def __init__(self, channels, rate, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(channels, 6, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(6, momentum=0.8, rngs=rngs)
    self.drop = nnx.Dropout(rate, rngs=rngs)

  def __call__(self, x, train: bool = False):
    x = nnx.relu(self.bn(self.conv(x), use_running_average=not train))
    return jnp.mean(self.drop(x, deterministic=not train), axis=(1, 2))


def nnx_run(rate):
  net = heads.make_network("task", [[0, 1]] * T, backbone=bridge.to_linen(NNXNet, 3, rate))
  return net, continual.run(USER_CFG, net, image_tasks(40, 0), image_tasks(20, 1))


def test_nnx_module_with_batchnorm_and_dropout_runs_in_train_and_eval_modes():
  """Its nnx.Param are the consolidated parameters, its BatchStat the model state (moved by
  training), dropout draws in training only."""
  net, full = nnx_run(0.3)
  assert set(full.params["backbone"]) == {"conv", "bn"} and set(full.model_state) == {"batch_stats"}
  assert full.curves[1]["loss_reg"][0] > 0  # the NNX parameters are consolidated
  _, init_state = heads.init_variables(net, jax.random.key(0), jnp.ones((1, 8, 8, 3)))
  moved = full.model_state["batch_stats"]["bn"]["mean"] - init_state["batch_stats"]["bn"]["mean"]
  assert float(jnp.max(jnp.abs(moved))) > 1e-3  # the train step ran it with train=True
  x = step_lib.scale_pixels(jnp.asarray(image_tasks(20, 1).inputs[0]))
  a, b = (heads.logits(net, full.params, x, 0, model_state=full.model_state) for _ in range(2))
  np.testing.assert_array_equal(a, b)  # evaluation: running statistics, no dropout
  _, no_dropout = nnx_run(0.0)
  assert no_dropout.curves[0]["loss_cls"] != full.curves[0]["loss_cls"]


class NNXNoTrain(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return jnp.mean(self.bn(self.conv(x)), axis=(1, 2))


def test_nnx_modules_that_cannot_be_run_right_are_refused_naming_the_fix():
  with pytest.raises(ValueError, match=r"NNX module NNXNoTrain: wrap its class as "
                     r"`flax.nnx.bridge.to_linen\(NNXNoTrain"):
    heads.make_network("task", [[0, 1]] * T, backbone=NNXNoTrain(rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"train/eval mode: bn \(BatchNorm\); its `__call__` must "
                     r"take `train: bool`"):
    heads.make_network("task", [[0, 1]] * T, backbone=bridge.to_linen(NNXNoTrain))


def test_loop_conv_refuses_an_unknown_kernel_grad():
  x, w = jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 2))
  with pytest.raises(ValueError, match=r"`kernel_grad` must be one of 'conv', 'unfold', but got "
                                       r"kernel_grad='im2col'"):
    backbones.loop_conv(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                        kernel_grad="im2col")
