"""The empirical Fisher of five kinds of Flax model against one training epoch (issue 23).

    python -m benchmarks.fisher_models [--quick] [--models=a,b] [--repeats=3]
                                       [--out=benchmarks/results]

(models: mlp, cnn_bn, resnet18, transformer, vit_patch; default all).

Writes ``benchmarks/results/fisher_models.json`` (one row per model) and prints a table. Only the
public API is used (``fisher_diagonal``, ``fisher_plan``), as a user of the library calls it.

Models (every parameter is weighed; inputs and labels are random: timings do not depend on the
values; 10 classes):

* ``mlp``: the runner's MLP 784-400-400 (``ewc_jax.heads``, a 10-way head) on 28x28 inputs.
* ``cnn_bn``: the CNN of flax/examples/mnist (linen: Conv 32 3x3, ReLU, avg-pool 2, Conv 64 3x3,
  ReLU, avg-pool 2, Dense 256, ReLU, Dense 10) with an ``nn.BatchNorm`` after each convolution,
  on 28x28x1 inputs. The Fisher's ``logits_fn`` runs in evaluation mode (the running statistics
  closed over); training updates them (``mutable``).
* ``resnet18``: the runner's reduced ResNet-18 (width 20, BatchNorm; ``ewc_jax.backbones``, a
  10-way head) on 32x32x3 inputs, as ``benchmarks/backbones.py`` builds it.
* ``transformer``: an NNX encoder classifier: token ``nnx.Embed`` (vocabulary 1000) + learned
  position ``nnx.Embed`` (128 positions), 4 pre-LayerNorm blocks (``nnx.LayerNorm``,
  ``nnx.MultiHeadAttention`` with 4 heads over d_model 256, MLP 1024 with GELU,
  ``nnx.Dropout(0.1)`` after attention and MLP), final LayerNorm, mean over the 128 tokens,
  ``nnx.Linear`` to 10. Training with dropout on; ``model.eval()`` before the Fisher, whose
  ``logits_fn`` is ``lambda p, x: nnx.merge(graphdef, p, rest)(x)`` with
  ``graphdef, p, rest = nnx.split(model, nnx.Param, ...)``.
* ``vit_patch``: a ViT-style NNX model on 32x32x3 images: 4x4 patches embedded by a strided
  ``nnx.Conv`` (d 192), plus a learned position embedding (an ``nnx.Param`` added with
  broadcasting), 2 pre-LayerNorm blocks (3 heads, MLP 768), final LayerNorm, mean over the 64
  patches, ``nnx.Linear`` to 10.

Measured per model, on N examples (``SIZES``; batch 128, N a multiple of it): mlp 8192, cnn_bn
1024, resnet18 512, transformer 256, vit_patch 512; ``--quick``: 1024, 256, 128, 128, 128. N
is sized so that the whole run (3 repeats) takes a few minutes on 2 idle CPU cores, most of it
the transformer (whose training epoch costs ~10 s per batch of 128 there); the ratios to an
epoch do not depend much on N, apart from the fixed cost of an eager call:

* ``fast_path_share``: the share of parameters (by count) whose ``fisher_plan`` method is not
  ``"vmap"``, the count of parameters per method and the leaves on ``"vmap"`` with the reason.
* ``epoch_s``: one training epoch over the N examples: a Python loop over a jitted train step
  (forward, backward, ``optax.adam(1e-3)`` update; BatchNorm in train mode, dropout on).
* ``fisher_jit_s``: ``fisher_diagonal(kind="empirical", batch_size=128)`` over the same N
  examples wrapped in ``jax.jit`` by the user, timed warm (compilation excluded).
* ``fisher_eager_s``: the same call made eagerly, with the same arguments (the same
  ``logits_fn`` object), timed from the second call on (the first is a warm-up);
  ``fisher_eager_first_s`` is the first call's time.
  The three are timed interleaved (epoch, jitted, eager; ``--repeats`` rounds after one warm-up
  round, medians reported), so that they see the same load on a shared machine; the ratios
  ``*_over_epoch`` divide by ``epoch_s``.
* ``memory_ratio``: compiled memory (``jax.jit(f).lower(...).compile().memory_analysis()``:
  temp + argument + output bytes) of the jitted Fisher on one batch of 128 examples over that of
  one jitted train step on 128 examples. ``peak_rss_mb_*``: the process's peak RSS
  (``ru_maxrss``, cumulative over the whole process, so only indicative) after the model's
  train-step and after its Fisher measurements.
* ``max_rel_error``: the Fisher of the first 32 examples (eager call, the same settings) against
  a brute-force reference ``jax.vmap(jax.grad(per-example loss))`` squared and averaged;
  per leaf max|F - F_ref| / max|F_ref|, the maximum over leaves (and which leaf). A leaf whose
  reference is below 1e-8 of the largest leaf's is measured against that floor (its importance
  is zero up to rounding, e.g. attention's key bias, which softmax cancels; listed in
  ``error_floored_leaves``). ``eager_vs_jit_max_rel_diff``: the same measure between the eager
  and jitted results over the N examples. ``max_rel_error_vs_float64`` and
  ``reference_max_rel_error_vs_float64``: the Fisher and the float32 brute force each against a
  float64 brute force (``jax.enable_x64``), to tell which side a difference comes from.
  ``max_rel_error_other_draws``: the same error on ``ERROR_DRAWS`` more draws of 32 random
  examples. With ReLU, float32 rounding can decide the sign of a pre-activation that is within
  rounding of 0 (both float32 results are then right to float32, but one example's gradient
  differs by a whole unit's contribution): the runner's ResNet-18 on the first draw gives
  4.8e-5 against 6.3e-7 for the brute force, and 1.7e-6 when its ReLUs are replaced by GELU
  (no kink); the other draws say how common that is.

Goals (issue 23's acceptance): fast-path share >= 99 %; eager and jitted Fisher <= 1.5 epochs
for every model and <= 1 epoch for ``mlp`` and ``transformer``; memory ratio <= 1.5; error
<= 1e-5. Each row carries a pass/fail per goal. ``--quick`` uses smaller N and one repeat (to
check the harness; its timings mean little). The JSON also records the settings, N, the machine
load (``os.getloadavg()``) before and after each model, the CPU count and the versions of jax,
jaxlib, flax, optax, numpy and ml_dtypes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import resource
import statistics
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import common
from ewc_jax import fisher_diagonal, fisher_plan, heads

BATCH = 128
ERROR_EXAMPLES = 32
ERROR_FLOOR = 1e-8   # see error_report
ERROR_DRAWS = 2      # further draws of ERROR_EXAMPLES for max_rel_error_other_draws
NUM_CLASSES = 10
LEARNING_RATE = 1e-3
MODELS = ("mlp", "cnn_bn", "resnet18", "transformer", "vit_patch")
# Examples per epoch (multiples of BATCH), sized so that the whole benchmark takes a few minutes
# on 2 CPU cores; --quick: one or two batches.
SIZES = {"mlp": 8192, "cnn_bn": 1024, "resnet18": 512, "transformer": 256, "vit_patch": 512}
QUICK_SIZES = {"mlp": 1024, "cnn_bn": 256, "resnet18": 128, "transformer": 128, "vit_patch": 128}
GOALS = {
    "fast_path_share": ">= 0.99 (goal 1.0)",
    "fisher_eager_over_epoch": "<= 1.5 for every model, <= 1.0 for mlp and transformer",
    "fisher_jit_over_epoch": "<= 1.5 for every model, <= 1.0 for mlp and transformer",
    "memory_ratio": "<= 1.5 (Fisher / train step, compiled temp + argument + output bytes)",
    "max_rel_error": "<= 1e-5 (vs brute-force vmap(grad), max over leaves)",
}
EPOCH_GOAL = {"mlp": 1.0, "transformer": 1.0}     # the others: 1.5
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes")

PyTree = Any


class Model(NamedTuple):
  """What the benchmark needs of one model.

  Attributes:
    name: the row's name.
    description: the architecture in words.
    params: the parameters the Fisher weighs (every trainable parameter).
    logits_fn: ``(params, x) -> [B, C]`` logits in evaluation mode (what the Fisher weighs).
    loss_fn: ``(params, state, x, y, key) -> (mean loss, state)`` in train mode.
    state: what the train step carries besides params (BatchNorm statistics, NNX RNG state).
    data: ``(key, n) -> (inputs [n, ...], labels [n])``.
    config: the model's size settings.
  """
  name: str
  description: str
  params: PyTree
  logits_fn: Callable[[PyTree, Any], jax.Array]
  loss_fn: Callable[..., tuple[jax.Array, PyTree]]
  state: PyTree
  data: Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]
  config: dict


def _xent(logits, labels):
  """Mean cross-entropy, in float32 at least (float64 for the double-precision reference)."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _image_data(shape):
  def data(key, n):
    kx, ky = jax.random.split(key)
    return (jax.random.uniform(kx, (n,) + tuple(shape), jnp.float32),
            jax.random.randint(ky, (n,), 0, NUM_CLASSES))
  return data


# --- the runner's backbones (mlp, resnet18) with a 10-way head --------------------------------

def _runner_model(name, description, backbone, input_shape, config, **options):
  net = heads.task_incremental(1, NUM_CLASSES, backbone=backbone, **options)
  example = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  params, model_state = heads.init_variables(net, jax.random.key(0), example)
  theta = heads.consolidated(net, params, "all")       # backbone and head: every parameter
  logits_fn = heads.consolidated_logits_fn(net, params, 0, model_state)

  def loss_fn(p, state, x, y, key):
    del key  # no dropout
    logits, state = heads.train_logits(net, heads.with_consolidated(params, p), state, x, 0)
    return _xent(logits, y), state

  return Model(name, description, theta, logits_fn, loss_fn, model_state,
               _image_data(input_shape), {"input_shape": list(input_shape), **config})


def build_mlp(hidden: Sequence[int] = (400, 400), image: int = 28) -> Model:
  """The runner's MLP (``heads.task_incremental(backbone="mlp")``) with a 10-way head."""
  hidden = tuple(hidden)
  desc = f"runner MLP {image * image}-" + "-".join(map(str, hidden)) + f"-{NUM_CLASSES}"
  return _runner_model("mlp", desc, "mlp", (image, image, 1), {"hidden": list(hidden)},
                       hidden=hidden)


def build_resnet18(width: int = 20, image: int = 32) -> Model:
  """The runner's reduced ResNet-18 (BatchNorm) with a 10-way head on ``image``² x 3 inputs."""
  return _runner_model("resnet18", f"runner ResNet-18 (width {width}, BatchNorm) + Dense 10",
                       "resnet18", (image, image, 3), {"width": width}, width=width)


# --- flax/examples/mnist's CNN with BatchNorm (linen) -----------------------------------------

class CNNBN(nn.Module):
  """flax/examples/mnist's CNN with an ``nn.BatchNorm`` after each convolution."""
  features: Sequence[int] = (32, 64)
  dense: int = 256

  @nn.compact
  def __call__(self, x, train: bool = False):
    for f in self.features:
      x = nn.Conv(f, kernel_size=(3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.avg_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense)(x))
    return nn.Dense(NUM_CLASSES)(x)


def build_cnn_bn(features: Sequence[int] = (32, 64), dense: int = 256, image: int = 28) -> Model:
  module = CNNBN(tuple(features), dense)
  shape = (image, image, 1)
  variables = module.init(jax.random.key(0), jnp.zeros((1,) + shape), train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  logits_fn = lambda p, x: module.apply(  # noqa: E731
      {"params": p, "batch_stats": batch_stats}, x, train=False)

  def loss_fn(p, state, x, y, key):
    del key
    logits, new = module.apply({"params": p, "batch_stats": state}, x, train=True,
                               mutable=["batch_stats"])
    return _xent(logits, y), new["batch_stats"]

  desc = (f"flax/examples CNN + BatchNorm: Conv {features[0]} 3x3-BN-relu-pool, Conv "
          f"{features[1]} 3x3-BN-relu-pool, Dense {dense}, Dense {NUM_CLASSES}")
  return Model("cnn_bn", desc, params, logits_fn, loss_fn, batch_stats, _image_data(shape),
               {"input_shape": list(shape), "features": list(features), "dense": dense})


# --- NNX: transformer encoder and ViT-style patch model ----------------------------------------

class Block(nnx.Module):
  """Pre-LayerNorm transformer block: x + drop(attn(ln(x))), then x + drop(mlp(ln(x)))."""

  def __init__(self, d: int, num_heads: int, mlp: int, dropout: float, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads, d, d, decode=False, rngs=rngs)
    self.drop1 = nnx.Dropout(dropout, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc1 = nnx.Linear(d, mlp, rngs=rngs)
    self.fc2 = nnx.Linear(mlp, d, rngs=rngs)
    self.drop2 = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x):
    x = x + self.drop1(self.attn(self.ln1(x)))
    return x + self.drop2(self.fc2(nnx.gelu(self.fc1(self.ln2(x)))))


class Transformer(nnx.Module):
  """Token + position ``nnx.Embed``, pre-LN blocks, final LayerNorm, mean pool, Linear."""

  def __init__(self, vocab, seq, d, num_heads, mlp, layers, dropout, rngs: nnx.Rngs):
    self.tokens = nnx.Embed(vocab, d, rngs=rngs)
    self.positions = nnx.Embed(seq, d, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.blocks = nnx.List([Block(d, num_heads, mlp, dropout, rngs) for _ in range(layers)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, NUM_CLASSES, rngs=rngs)

  def __call__(self, tokens):
    x = self.tokens(tokens) + self.positions(jnp.arange(tokens.shape[1]))[None]
    x = self.drop(x)
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(self.ln(x), axis=1))


class ViT(nnx.Module):
  """Strided-conv patch embedding + broadcast position embedding, pre-LN blocks, mean pool."""

  def __init__(self, image, patch, d, num_heads, mlp, layers, rngs: nnx.Rngs):
    self.patches = nnx.Conv(3, d, (patch, patch), strides=(patch, patch), padding="VALID",
                            rngs=rngs)
    num = (image // patch) ** 2
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, num, d)))
    self.blocks = nnx.List([Block(d, num_heads, mlp, 0.0, rngs) for _ in range(layers)])
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, NUM_CLASSES, rngs=rngs)

  def __call__(self, images):
    x = self.patches(images)
    x = x.reshape((x.shape[0], -1, x.shape[-1])) + self.pos[...]
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(self.ln(x), axis=1))


def _nnx_model(name, description, model, data, config):
  model.train()
  train_graphdef, _, train_rest = nnx.split(model, nnx.Param, ...)
  model.eval()                                    # dropout off for the Fisher
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  logits_fn = lambda p, x: nnx.merge(graphdef, p, rest)(x)  # noqa: E731

  def loss_fn(p, state, x, y, key):
    del key  # dropout draws from the module's own RNG streams (in ``state``)
    # Fresh Variables for the RNG state (tree.map rebuilds them in this trace): merging the
    # caller's own Variables and advancing the dropout counters inside jax.grad raises
    # flax's TraceContextError (flax 0.12).
    m = nnx.merge(train_graphdef, p, jax.tree.map(lambda v: v, state))
    loss = _xent(m(x), y)
    return loss, nnx.split(m, nnx.Param, ...)[2]

  return Model(name, description, params, logits_fn, loss_fn, train_rest, data, config)


def build_transformer(layers: int = 4, d: int = 256, num_heads: int = 4, mlp: int = 1024,
                      seq: int = 128, vocab: int = 1000, dropout: float = 0.1) -> Model:
  model = Transformer(vocab, seq, d, num_heads, mlp, layers, dropout, nnx.Rngs(0))

  def data(key, n):
    kx, ky = jax.random.split(key)
    return (jax.random.randint(kx, (n, seq), 0, vocab),
            jax.random.randint(ky, (n,), 0, NUM_CLASSES))

  config = {"layers": layers, "d_model": d, "heads": num_heads, "mlp": mlp, "seq": seq,
            "vocab": vocab, "dropout": dropout}
  desc = (f"NNX transformer encoder: {layers} pre-LN blocks, d {d}, {num_heads} heads, MLP {mlp}, "
          f"seq {seq}, vocab {vocab}, dropout {dropout}, mean pool, Linear {NUM_CLASSES}")
  return _nnx_model("transformer", desc, model, data, config)


def build_vit_patch(image: int = 32, patch: int = 4, d: int = 192, num_heads: int = 3,
                    mlp: int = 768, layers: int = 2) -> Model:
  model = ViT(image, patch, d, num_heads, mlp, layers, nnx.Rngs(0))
  config = {"input_shape": [image, image, 3], "patch": patch, "d_model": d, "heads": num_heads,
            "mlp": mlp, "layers": layers}
  desc = (f"NNX ViT block: {patch}x{patch} patches of {image}x{image}x3 by a strided Conv to "
          f"d {d}, + position Param, {layers} pre-LN blocks ({num_heads} heads, MLP {mlp}), "
          f"mean pool, Linear {NUM_CLASSES}")
  return _nnx_model("vit_patch", desc, model, _image_data((image, image, 3)), config)


BUILDERS: dict[str, Callable[..., Model]] = {
    "mlp": build_mlp, "cnn_bn": build_cnn_bn, "resnet18": build_resnet18,
    "transformer": build_transformer, "vit_patch": build_vit_patch,
}
# Tiny sizes of each builder, for the test suite (seconds on a CPU).
TINY = {
    "mlp": {"hidden": (16, 8), "image": 6},
    "cnn_bn": {"features": (4, 6), "dense": 8, "image": 8},
    "resnet18": {"width": 2, "image": 8},
    "transformer": {"layers": 2, "d": 16, "num_heads": 2, "mlp": 24, "seq": 6, "vocab": 20},
    "vit_patch": {"image": 8, "patch": 4, "d": 12, "num_heads": 2, "mlp": 16, "layers": 1},
}


# --- measurements -------------------------------------------------------------------------------

def reference_fisher(logits_fn, params, x, y, *, float64: bool = False) -> PyTree:
  """Brute force: ``jax.vmap(jax.grad(per-example loss))``, squared, averaged over examples.

  ``float64``: the same in double precision (``jax.enable_x64``; float parameters and inputs
  cast to float64, whatever ``logits_fn`` closes over promoted with them), as numpy arrays: an
  arbiter for differences between two float32 results.
  """
  def loss(p, xi, yi):
    return _xent(logits_fn(p, xi[None]), yi[None])

  def run(p, xs, ys):
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(p, xs, ys)
    return jax.tree.map(lambda g: jnp.mean(jnp.square(g), axis=0), grads)

  if not float64:
    return run(params, x, y)
  with jax.enable_x64(True):
    up = lambda a: (jnp.asarray(a, jnp.float64)  # noqa: E731
                    if jnp.issubdtype(jnp.result_type(a), jnp.floating) else jnp.asarray(a))
    out = run(jax.tree.map(up, params), jax.tree.map(up, x), jnp.asarray(y))
    return jax.tree.map(np.asarray, out)


def error_report(got, ref) -> dict:
  """Per leaf max|got - ref| / max|ref|, the maximum over leaves (leaves matched in flattening
  order, paths from ``ref``).

  A leaf whose reference is below ``ERROR_FLOOR`` times the largest reference value of any leaf
  is measured against that floor instead: its importance is zero up to float32 rounding (e.g.
  attention's key bias, which softmax cancels exactly), and a ratio of two rounding errors would
  say nothing. ``floored_leaves`` lists them.
  """
  a = [np.asarray(u, np.float64) for u in jax.tree.leaves(got)]
  flat = jax.tree_util.tree_flatten_with_path(ref)[0]
  b = [np.asarray(v, np.float64) for _, v in flat]
  assert len(a) == len(b), (len(a), len(b))
  top = max((float(np.max(np.abs(v))) for v in b if v.size), default=0.0)
  floor = ERROR_FLOOR * top
  worst, worst_path, floored = 0.0, None, []
  for (path, _), u, v in zip(flat, a, b):
    assert u.shape == v.shape, (jax.tree_util.keystr(path), u.shape, v.shape)
    if not v.size:
      continue
    scale = float(np.max(np.abs(v)))
    if scale < floor:
      floored.append(jax.tree_util.keystr(path))
      scale = floor
    err = float(np.max(np.abs(u - v))) / scale if scale > 0 else float(np.max(np.abs(u - v)))
    if err >= worst:
      worst, worst_path = err, jax.tree_util.keystr(path)
  return {"max_rel_error": worst, "worst_leaf": worst_path, "floored_leaves": floored}


def max_rel_error(got, ref) -> float:
  """The ``max_rel_error`` of :func:`error_report`."""
  return error_report(got, ref)["max_rel_error"]


def plan_summary(model: Model, x) -> dict:
  """``fisher_plan``: parameter counts per method, the fast-path share, the leaves on vmap."""
  plan = fisher_plan(model.logits_fn, model.params, x)
  counts: dict[str, int] = {}
  leaves: dict[str, int] = {}
  vmap = []
  for leaf in plan:
    size = int(np.prod(leaf.shape, dtype=np.int64))
    counts[leaf.method] = counts.get(leaf.method, 0) + size
    leaves[leaf.method] = leaves.get(leaf.method, 0) + 1
    if leaf.method == "vmap":
      vmap.append({"path": leaf.path, "shape": list(leaf.shape), "reason": leaf.reason})
  total = sum(counts.values())
  return {"parameters": total, "leaves": len(plan),
          "fast_path_share": 1.0 - counts.get("vmap", 0) / total,
          "parameters_by_method": counts, "leaves_by_method": leaves, "vmap_leaves": vmap}


def _memory_bytes(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output")}
  out["total"] = out["temp"] + out["argument"] + out["output"]
  return out


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


def measure(model: Model, n: int, repeats: int) -> dict:
  """One row: plan, epoch, jitted and eager Fisher, memory and error (see the module docstring)."""
  load_before = _load()
  x, y = model.data(jax.random.key(1), n)
  row = {"model": model.name, "description": model.description, "config": model.config,
         "examples": n, "batch_size": BATCH}
  row.update(plan_summary(model, x))

  tx = optax.adam(LEARNING_RATE)

  def step(params, opt_state, state, xb, yb, key):
    (loss, state), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
        params, state, xb, yb, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, state, loss

  train_step = jax.jit(step)
  batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, n, BATCH)]
  key = jax.random.key(2)

  def epoch():
    p, s, st = model.params, tx.init(model.params), model.state
    for xb, yb in batches:
      p, s, st, loss = train_step(p, s, st, xb, yb, key)
    return jax.block_until_ready((p, s, st, loss))

  logits_fn = model.logits_fn
  fisher_jit = jax.jit(lambda p, xs, ys: fisher_diagonal(logits_fn, p, xs, ys, kind="empirical",
                                                         batch_size=BATCH))
  results = {}

  def jitted():
    results["jit"] = jax.block_until_ready(fisher_jit(model.params, x, y))

  def eager():
    results["eager"] = jax.block_until_ready(fisher_diagonal(
        logits_fn, model.params, x, y, kind="empirical", batch_size=BATCH))

  # Warm-up round: compiles the train step and the jitted Fisher; the eager first call.
  epoch()
  row["peak_rss_mb_after_train"] = _rss_mb()
  jitted()
  t0 = time.perf_counter()
  eager()
  row["fisher_eager_first_s"] = time.perf_counter() - t0
  times: dict[str, list[float]] = {"epoch": [], "jit": [], "eager": []}
  for _ in range(repeats):
    for name, fn in (("epoch", epoch), ("jit", jitted), ("eager", eager)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  row["peak_rss_mb_after_fisher"] = _rss_mb()
  med = {k: statistics.median(v) for k, v in times.items()}
  row.update({"epoch_s": med["epoch"], "fisher_jit_s": med["jit"], "fisher_eager_s": med["eager"],
              "fisher_jit_over_epoch": med["jit"] / med["epoch"],
              "fisher_eager_over_epoch": med["eager"] / med["epoch"], "repeats": repeats,
              "times_s": times})
  row["eager_vs_jit_max_rel_diff"] = max_rel_error(results["eager"], results["jit"])

  # Compiled memory at the same batch: the jitted Fisher on 128 examples vs one train step.
  xb, yb = batches[0]
  opt_state = tx.init(model.params)
  train_mem = _memory_bytes(train_step.lower(model.params, opt_state, model.state, xb, yb,
                                             key).compile())
  fisher_mem = _memory_bytes(fisher_jit.lower(model.params, xb, yb).compile())
  row.update({"train_step_memory_bytes": train_mem, "fisher_memory_bytes": fisher_mem,
              "memory_ratio": fisher_mem["total"] / train_mem["total"]})

  # Exactness against brute-force vmap(grad) on a small subset (the eager call, same settings).
  m = min(ERROR_EXAMPLES, n)
  got = fisher_diagonal(logits_fn, model.params, x[:m], y[:m], kind="empirical",
                        batch_size=BATCH)
  row["error_examples"] = m
  ref = reference_fisher(logits_fn, model.params, x[:m], y[:m])
  report = error_report(got, ref)
  row["max_rel_error"] = report["max_rel_error"]
  row["max_rel_error_leaf"] = report["worst_leaf"]
  row["error_floored_leaves"] = report["floored_leaves"]
  # Both against a float64 brute force: which of the two float32 results the difference is in.
  ref64 = reference_fisher(logits_fn, model.params, x[:m], y[:m], float64=True)
  row["max_rel_error_vs_float64"] = max_rel_error(got, ref64)
  row["reference_max_rel_error_vs_float64"] = max_rel_error(ref, ref64)
  others = []
  for k in range(ERROR_DRAWS):
    xk, yk = model.data(jax.random.key(100 + k), m)
    others.append(max_rel_error(
        fisher_diagonal(logits_fn, model.params, xk, yk, kind="empirical", batch_size=BATCH),
        reference_fisher(logits_fn, model.params, xk, yk)))
  row["max_rel_error_other_draws"] = others
  row["load_before"], row["load_after"] = load_before, _load()
  row["passes"] = judge(row)
  return row


def judge(row: dict) -> dict:
  """Pass/fail of each goal (see ``GOALS``)."""
  epochs = EPOCH_GOAL.get(row["model"], 1.5)
  return {"fast_path_share": row["fast_path_share"] >= 0.99,
          "fisher_eager_over_epoch": row["fisher_eager_over_epoch"] <= epochs,
          "fisher_jit_over_epoch": row["fisher_jit_over_epoch"] <= epochs,
          "memory_ratio": row["memory_ratio"] <= 1.5,
          "max_rel_error": row["max_rel_error"] <= 1e-5}


def versions() -> dict:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def table(rows: list[dict]) -> str:
  def mark(row, key):
    return "" if row["passes"][key] else " x"
  head = (f"{'model':<12}{'params':>10}{'fast %':>9}{'N':>6}{'epoch s':>9}{'jit/ep':>9}"
          f"{'eager/ep':>10}{'mem':>8}{'max err':>10}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(
        f"{r['model']:<12}{r['parameters']:>10,}"
        f"{100 * r['fast_path_share']:>7.1f}{mark(r, 'fast_path_share'):<2}"
        f"{r['examples']:>6}{r['epoch_s']:>9.3f}"
        f"{r['fisher_jit_over_epoch']:>7.2f}{mark(r, 'fisher_jit_over_epoch'):<2}"
        f"{r['fisher_eager_over_epoch']:>8.2f}{mark(r, 'fisher_eager_over_epoch'):<2}"
        f"{r['memory_ratio']:>6.2f}{mark(r, 'memory_ratio'):<2}"
        f"{r['max_rel_error']:>8.1e}{mark(r, 'max_rel_error'):<2}")
  lines.append("x: goal missed (see 'goals')")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="smaller N, one repeat")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--repeats", type=int, default=None, help="default 3 (--quick: 1)")
  parser.add_argument("--out", default=str(common.RESULTS))
  args = parser.parse_args(argv)
  names = [s for s in args.models.split(",") if s]
  unknown = [s for s in names if s not in BUILDERS]
  if unknown:
    parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
  sizes = QUICK_SIZES if args.quick else SIZES
  repeats = args.repeats or (1 if args.quick else 3)
  start = time.perf_counter()
  load_start = _load()
  rows = []
  for name in names:
    row = measure(BUILDERS[name](), sizes[name], repeats)
    rows.append(row)
    print({k: row[k] for k in ("model", "parameters", "fast_path_share", "epoch_s",
                               "fisher_jit_over_epoch", "fisher_eager_over_epoch",
                               "memory_ratio", "max_rel_error")}, flush=True)
  payload = {
      "quick": args.quick,
      "settings": {"kind": "empirical", "batch_size": BATCH, "optimizer": "optax.adam",
                   "learning_rate": LEARNING_RATE, "repeats": repeats,
                   "error_examples": ERROR_EXAMPLES, "examples": {n: sizes[n] for n in names},
                   "data": "random inputs and labels (10 classes)"},
      "goals": GOALS, "epoch_goal_by_model": {n: EPOCH_GOAL.get(n, 1.5) for n in names},
      "versions": versions(), "cpu_count": os.cpu_count(), "load_start": load_start,
      "load_end": _load(), "wall_s": time.perf_counter() - start,
      "all_pass": all(all(r["passes"].values()) for r in rows), "rows": rows}
  common.write("fisher_models", payload, folder=args.out)
  print(table(rows))


if __name__ == "__main__":
  main()
