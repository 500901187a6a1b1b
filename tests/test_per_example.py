"""Every per-example rule of ewc_jax.per_example equals vmap(grad), on randomised shapes: multi-axis
and either-side dot_general (LinearGeneral, einsum projections, batch dimensions, kernels stored
[out, in]), grouped and depthwise convolutions and several images per example, embedding lookups
with repeated tokens, tied weights, biases and every normalisation layer, bf16 compute, and a
small NNX transformer whose plan has no vmap leaf."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ewc_jax import fisher_diagonal, fisher_plan

RTOL = 2e-5


def _close(a_tree, b_tree, rtol=RTOL, what=""):
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(a_tree)[0],
                          jax.tree.leaves(b_tree)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b))), 1e-30)
    assert np.max(np.abs(a - b)) <= rtol * scale, (what, jax.tree_util.keystr(path),
                                                    np.max(np.abs(a - b)) / scale)


def _check(fn, params, x, y, *, kinds=("empirical",), rules=None, rtol=RTOL, batch_size=4,
           label_mask=None):
  plan = {leaf.path: leaf.method for leaf in fisher_plan(fn, params, x)}
  assert "vmap" not in plan.values(), plan
  if rules is not None:
    for path, rule in rules.items():
      assert plan[path] == rule, (path, plan[path])
  for kind in kinds:
    got = fisher_diagonal(fn, params, x, y, label_mask, kind=kind, batch_size=batch_size)
    ref = fisher_diagonal(fn, params, x, y, label_mask, kind=kind, batch_size=batch_size,
                          method="vmap")
    assert max(float(np.max(v)) for v in jax.tree.leaves(ref)) > 0
    _close(got, ref, rtol, kind)
  return plan


def _rand(rng, *shape, scale=0.5):
  return jnp.asarray((scale * rng.normal(size=shape)).astype(np.float32))


EINSUMS = {
    # name: (spec of x · W, x shape per example, W shape); "rows" when x has several rows.
    "linear_general_in": ("td,dhk->thk", (3, 4), (4, 2, 3)),
    "linear_general_out": ("thk,hkd->td", (3, 2, 3), (2, 3, 4)),
    "kernel_out_in": ("ti,oi->to", (3, 4), (5, 4)),
    "kernel_left": ("dhk,td->thk", (3, 4), (4, 2, 3)),
    "per_head_batch": ("thd,hde->the", (3, 2, 4), (2, 4, 3)),
    "dense_one_row": ("i,io->o", (4,), (4, 5)),
    "dense_two_contracting": ("ij,ijo->o", (2, 3), (2, 3, 4)),
}


def test_dot_general_in_any_layout_equals_vmap():
  """Every layout of EINSUMS in one model (one leaf each, summed into the logits): one compile."""
  rng = np.random.default_rng(0)
  def project(spec, w, xe):
    return jnp.einsum(spec, *((w, xe) if spec.startswith("dhk,") else (xe, w)))
  params, inputs = {}, {}
  for name, (spec, xs, ws) in sorted(EINSUMS.items()):
    width = int(np.prod(jax.eval_shape(lambda w, xe, spec=spec: project(spec, w, xe),
                                       jnp.zeros(ws), jnp.zeros(xs)).shape))
    params[name] = {"w": _rand(rng, *ws), "out": _rand(rng, width, 3)}
    inputs[name] = _rand(rng, 6, *xs, scale=1.0)

  def fn(p, x):
    total = 0.0
    for name, (spec, _, _) in sorted(EINSUMS.items()):
      h = jax.vmap(lambda xe, name=name, spec=spec: project(spec, p[name]["w"], xe))(x[name])
      total = total + jnp.tanh(h.reshape(h.shape[0], -1)) @ p[name]["out"]
    return total
  y = jnp.asarray(rng.integers(0, 3, 6), jnp.int32)
  plan = _check(fn, params, inputs, y)
  for name in EINSUMS:
    assert plan[f"['{name}']['w']"] in ("dense", "rows"), (name, plan)


class _Convs(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), feature_group_count=2)(x))          # grouped
    x = nn.relu(nn.Conv(6, (3, 3), feature_group_count=6, strides=2)(x))  # depthwise
    x = nn.relu(nn.Conv(12, (2, 2), feature_group_count=3, kernel_dilation=2)(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_grouped_and_depthwise_convolutions_equal_vmap():
  m = _Convs()
  rng = np.random.default_rng(1)
  x = _rand(rng, 5, 8, 8, 2, scale=1.0)
  params = jax.tree.map(lambda s: _rand(rng, *s.shape),
                        jax.eval_shape(m.init, jax.random.key(0), x[:1])["params"])
  y = jnp.arange(5) % 3
  plan = _check(lambda p, xb: m.apply({"params": p}, xb), params, x, y, kinds=("empirical",))
  assert [plan[f"['Conv_{i}']['kernel']"] for i in range(3)] == ["conv"] * 3


def test_convolutions_in_float64_equal_vmap():
  """Under ``jax.enable_x64`` (int64 indices) the conv rule's loop over filter offsets works; the
  Fisher is accumulated in float32, as documented, so float32 rounding is what it differs by."""
  m = _Convs()
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 2)), jnp.float64)
    params = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), jnp.float64),
                          jax.eval_shape(m.init, jax.random.key(0), x[:1])["params"])
    _check(lambda p, xb: m.apply({"params": p}, xb), params, x, jnp.arange(4) % 3, rtol=1e-6)
    got = fisher_diagonal(lambda p, xb: m.apply({"params": p}, xb), params, x, jnp.arange(4) % 3)
    assert {v.dtype for v in jax.tree.leaves(got)} == {jnp.dtype(jnp.float32)}


def test_several_images_per_example_conv_equals_vmap():
  rng = np.random.default_rng(2)
  def fn(p, x):                      # x: [B, 2, 6, 6, 1]: two views per example
    b = x.shape[0]
    h = jax.lax.conv_general_dilated(x.reshape(b * 2, 6, 6, 1), p["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(h).reshape(b, -1) @ p["w"]
  params = {"k": _rand(rng, 3, 3, 1, 2), "w": _rand(rng, 2 * 6 * 6 * 2, 3)}
  x = _rand(rng, 5, 2, 6, 6, 1, scale=1.0)
  plan = _check(fn, params, x, jnp.arange(5) % 3)
  assert plan["['k']"] == "conv"


@pytest.mark.parametrize("mode", ["fill", "clip"])
def test_embedding_lookup_with_repeated_tokens_equals_vmap(mode):
  rng = np.random.default_rng(3)
  def fn(p, tok):
    e = jnp.take(p["emb"], tok, axis=0, mode=mode)                   # [B, T, D]
    return jnp.tanh(e).mean(axis=1) @ p["w"]
  params = {"emb": _rand(rng, 7, 4), "w": _rand(rng, 4, 3)}
  tok = jnp.asarray(rng.integers(0, 4, (6, 9)), jnp.int32)          # 9 tokens of 4: repeats
  if mode == "clip":
    tok = tok.at[0, 0].set(11)                                        # clipped to row 6
  plan = _check(fn, params, tok, jnp.arange(6) % 3)
  assert plan["['emb']"] == "embed"


def test_tied_embedding_and_output_projection_equal_vmap():
  rng = np.random.default_rng(4)
  def fn(p, tok):
    h = jnp.tanh(p["emb"][tok] @ p["mix"])                           # [B, T, D]
    return h @ p["emb"].T                                            # tied: [B, T, V] logits
  params = {"emb": _rand(rng, 6, 4), "mix": _rand(rng, 4, 4)}
  tok = jnp.asarray(rng.integers(0, 6, (5, 3)), jnp.int32)
  y = jnp.asarray(rng.integers(0, 6, (5, 3)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, (5, 3)), jnp.float32).at[:, 0].set(1.0)
  plan = _check(fn, params, tok, y, label_mask=mask)
  assert plan["['emb']"] == "tied" and plan["['mix']"] == "rows"


class _Norms(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    x = nn.GroupNorm(num_groups=2)(x)
    x = nn.relu(x).reshape(x.shape[0], -1, 4)
    x = nn.LayerNorm()(x)
    x = nn.RMSNorm()(x)
    return nn.Dense(3)(x.mean(axis=1))


def test_normalisation_scales_and_biases_are_elementwise_and_exact():
  m = _Norms()
  rng = np.random.default_rng(5)
  x = _rand(rng, 6, 5, 5, 2, scale=1.0)
  v = m.init(jax.random.key(0), x[:1])
  params = jax.tree.map(lambda a: a + _rand(rng, *a.shape, scale=0.3), v["params"])
  stats = jax.tree.map(lambda a: jnp.abs(a + _rand(rng, *a.shape)), v["batch_stats"])
  fn = lambda p, xb: m.apply({"params": p, "batch_stats": stats}, xb)  # noqa: E731
  plan = _check(fn, params, x, jnp.arange(6) % 3, kinds=("empirical", "true"))
  for name in ("BatchNorm_0", "GroupNorm_0", "LayerNorm_0"):
    assert plan[f"['{name}']['scale']"] == plan[f"['{name}']['bias']"] == "elementwise"
  assert plan["['RMSNorm_0']['scale']"] == "elementwise"


def test_bf16_compute_keeps_every_rule():
  rng = np.random.default_rng(6)
  def fn(p, tok):
    e = p["emb"][tok].astype(jnp.bfloat16)
    h = jnp.einsum("btd,dhk->bthk", e, p["q"].astype(jnp.bfloat16)) + p["b"].astype(jnp.bfloat16)
    return (jnp.tanh(h).reshape(tok.shape[0], -1).astype(jnp.float32)) @ p["w"]
  params = {"emb": _rand(rng, 6, 4), "q": _rand(rng, 4, 2, 2), "b": _rand(rng, 2, 2),
            "w": _rand(rng, 3 * 4, 3)}
  tok = jnp.asarray(rng.integers(0, 6, (5, 3)), jnp.int32)
  plan = {l.path: l.method for l in fisher_plan(fn, params, tok)}
  assert plan == {"['b']": "elementwise", "['emb']": "embed", "['q']": "rows", "['w']": "dense"}
  y = jnp.arange(5) % 3
  got = fisher_diagonal(fn, params, tok, y)
  ref = fisher_diagonal(fn, params, tok, y, method="vmap")
  _close(got, ref, rtol=5e-2)       # vmap(grad) rounds per-example gradients to bf16


class _Block(nnx.Module):
  def __init__(self, d, rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.att = nnx.MultiHeadAttention(num_heads=2, in_features=d, qkv_features=d, decode=False,
                                      rngs=rngs)
    self.ln2 = nnx.RMSNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 2 * d, rngs=rngs)
    self.down = nnx.Linear(2 * d, d, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)

  def __call__(self, x):
    x = x + self.drop(self.att(self.ln1(x)))
    return x + self.drop(self.down(jax.nn.gelu(self.up(self.ln2(x)))))


class _TinyLM(nnx.Module):
  def __init__(self, vocab, d, t, rngs):
    self.tok = nnx.Embed(vocab, d, rngs=rngs)
    self.pos = nnx.Param(0.1 * jax.random.normal(rngs.params(), (t, d)))
    self.block = _Block(d, rngs)
    self.ln = nnx.LayerNorm(d, rngs=rngs)

  def __call__(self, tokens):
    h = self.tok(tokens) + self.pos[: tokens.shape[1]]
    return self.tok.attend(self.ln(self.block(h)))                     # tied output: [B, T, V]


def test_nnx_transformer_language_model_every_leaf_fast_and_exact():
  model = _TinyLM(11, 8, 5, nnx.Rngs(0))
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fn = lambda p, x: nnx.merge(graphdef, p, rest)(x)  # noqa: E731
  rng = np.random.default_rng(7)
  tok = jnp.asarray(rng.integers(0, 11, (4, 5)), jnp.int32)
  y = jnp.roll(tok, -1, axis=1)
  mask = jnp.ones((4, 5)).at[:, -1].set(0.0).at[0, 2:].set(0.0)     # padding
  plan = {l.path: l.method for l in fisher_plan(fn, params, tok)}
  assert "vmap" not in plan.values(), plan
  assert plan["['tok']['embedding']"] == "tied"
  assert plan["['block']['att']['query']['kernel']"] == "rows"
  assert plan["['block']['ln1']['scale']"] == "elementwise"
  assert plan["['pos']"] == "elementwise"
  got = fisher_diagonal(fn, params, tok, y, mask, batch_size=3)
  ref = fisher_diagonal(fn, params, tok, y, mask, batch_size=3, method="vmap")
  _close(got, ref)
