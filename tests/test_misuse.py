"""The misuse table: each mistake a hurried user makes -> one ValueError whose message names the
argument and the fix (ewc_jax.misuse). Silent cases (probabilities for logits, linen's whole
variables, an Anchor built inside the loss, training-mode dropout) and misleading ones (an
nnx.Module, a string λ, nnx.update inside logits_fn) are among them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ewc_jax import (Anchor, add_ewc_gradient, ewc_loss, fisher_accumulator, fisher_diagonal,
                     fisher_from_batches, fisher_from_nll, fisher_plan, stack_anchors)

X = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3)), jnp.float32)
Y = jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32)
P = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 3)), jnp.float32),
     "b": jnp.zeros(3)}
F = jax.tree.map(jnp.ones_like, P)


def fn(p, x):
  return x @ p["w"] + p["b"]


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(4)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(3)(x)


LINEN = _Linen()
LV = LINEN.init(jax.random.key(0), X)
ABS = lambda t: jax.tree.map(jnp.abs, t)  # noqa: E731


class _LinenDrop(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(nn.Dense(4)(x)))


DROP = _LinenDrop()
DV = DROP.init(jax.random.key(0), X)


class _Nnx(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(3, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.b = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.b(self.drop(self.bn(self.a(x))))


def _nnx_model(train: bool):
  m = _Nnx(nnx.Rngs(0))
  if not train:
    m.eval()
  return m


def _nnx_fn(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return (lambda p, x: nnx.merge(graphdef, p, rest)(x)), params


def _anchor_inside_loss():
  jax.grad(lambda q: ewc_loss(q, (Anchor(q, F),), lam=1.0))(P)


def _pairs_inside_loss():
  jax.grad(lambda q: ewc_loss(q, [(q, F)], lam=1.0))(P)


def _nnx_update_inside():
  m = _nnx_model(False)
  def bad(p, x):
    nnx.update(m, p)
    return m(x)
  fisher_diagonal(bad, nnx.state(m, nnx.Param), X, Y)


def _jit_probs():
  jax.block_until_ready(jax.jit(lambda p: fisher_diagonal(
      lambda q, x: jax.nn.softmax(fn(q, x)), p, X, Y))(P))


def _jit_labels():
  jax.block_until_ready(jax.jit(lambda p, y: fisher_diagonal(fn, p, X, y))(P, Y + 5))


def _sequence_fn(p, x):
  return jnp.stack([fn(p, x)] * 2, axis=1)          # [B, 2, C]


def _bad_sample(q, b, key):
  del q, key
  return {"x": b["x"]}


def _nll(p, b):
  return optax.softmax_cross_entropy_with_integer_labels(fn(p, b["x"]), b["y"])


BATCH = {"x": X, "y": Y}

CASES = {
    # --- fisher_diagonal: silent cases made loud.
    "probabilities_for_logits": (
        lambda: fisher_diagonal(lambda p, x: jax.nn.softmax(fn(p, x)), P, X, Y),
        "returned probabilities"),
    "probabilities_under_jit": (_jit_probs, "returned probabilities"),
    "linen_whole_variables": (
        lambda: fisher_diagonal(lambda v, x: LINEN.apply(v, x), LV, X, Y), "linen's collections"),
    "nnx_whole_state_batch_stats": (
        lambda: fisher_diagonal(_nnx_fn(_nnx_model(False))[0], nnx.state(_nnx_model(False)), X, Y),
        "not a parameter"),
    "nnx_dropout_in_training_mode": (
        lambda: fisher_diagonal(*_nnx_fn(_nnx_model(True)), X, Y), "model.eval()"),
    "linen_dropout_in_training_mode": (
        lambda: fisher_diagonal(lambda p, x: DROP.apply(
            {"params": p}, x, train=True, rngs={"dropout": jax.random.key(0)}), DV["params"], X, Y),
        "evaluation mode"),
    "linen_batchnorm_in_training_mode": (
        lambda: fisher_diagonal(lambda p, x: LINEN.apply(
            {"params": p, "batch_stats": LV["batch_stats"]}, x, train=True,
            rngs={"dropout": jax.random.key(0)}), LV["params"], X, Y), "train=False"),
    "logits_fn_ignores_params": (
        lambda: fisher_diagonal(lambda p, x: fn(P, x), P, X, Y), "does not depend on the `params`"),
    "labels_out_of_range": (lambda: fisher_diagonal(fn, P, X, Y + 1), "must lie in [0, 3)"),
    "labels_out_of_range_under_jit": (_jit_labels, "must lie in [0, C)"),
    "negative_labels": (lambda: fisher_diagonal(fn, P, X, Y - 1), "must lie in [0, 3)"),
    # --- fisher_diagonal: misleading errors that now name the fix.
    "nnx_module_as_params": (
        lambda: fisher_diagonal(_nnx_fn(_nnx_model(False))[0], _nnx_model(False), X, Y),
        "nnx.state(model, nnx.Param)"),
    "nnx_update_inside_logits_fn": (_nnx_update_inside, "nnx.merge(graphdef, p, rest)"),
    "linen_mutable_tuple": (
        lambda: fisher_diagonal(lambda p, x: LINEN.apply(
            {"params": p, "batch_stats": LV["batch_stats"]}, x, mutable=["batch_stats"]),
            LV["params"], X, Y), "(logits, updates)"),
    # --- fisher_diagonal: arguments.
    "float_labels": (lambda: fisher_diagonal(fn, P, X, Y.astype(jnp.float32)), "integer"),
    "labels_wrong_length": (lambda: fisher_diagonal(fn, P, X, Y[:4]), "must have shape (6,)"),
    "labels_missing": (lambda: fisher_diagonal(fn, P, X), "`labels` are required"),
    "bad_kind": (lambda: fisher_diagonal(fn, P, X, Y, kind="exact"), "`kind` must be one of"),
    "bad_method": (lambda: fisher_diagonal(fn, P, X, Y, method="fast"), "`method` must be"),
    "bad_reduction": (lambda: fisher_diagonal(fn, P, X, Y, reduction="avg"), "`reduction`"),
    "batch_size_zero": (lambda: fisher_diagonal(fn, P, X, Y, batch_size=0), "`batch_size`"),
    "batch_size_string": (lambda: fisher_diagonal(fn, P, X, Y, batch_size="128"), "`batch_size`"),
    "batch_size_bool": (lambda: fisher_diagonal(fn, P, X, Y, batch_size=True), "`batch_size`"),
    "sampled_without_key": (lambda: fisher_diagonal(fn, P, X, kind="sampled"), "`key`"),
    "row_mask_wrong_shape": (lambda: fisher_diagonal(fn, P, X, Y, mask=jnp.ones(5)), "`mask`"),
    "label_mask_wrong_shape": (
        lambda: fisher_diagonal(_sequence_fn, P, X, jnp.zeros((6, 2), jnp.int32),
                                jnp.ones((6, 3))), "`label_mask` must have shape (6, 2)"),
    "sequence_labels_one_per_row": (
        lambda: fisher_diagonal(_sequence_fn, P, X, Y), "must have shape (6, 2)"),
    "one_dim_output": (lambda: fisher_diagonal(lambda p, x: fn(p, x)[:, 0], P, X, Y),
                       "keep the batch axis"),
    "integer_output": (lambda: fisher_diagonal(lambda p, x: jnp.argmax(fn(p, x), -1)[:, None] *
                                               jnp.ones((1, 3), jnp.int32), P, X, Y),
                       "must return floats"),
    "empty_inputs": (lambda: fisher_diagonal(fn, P, X[:0], Y[:0]), "non-empty"),
    "inputs_of_different_lengths": (
        lambda: fisher_diagonal(lambda p, x: fn(p, x["a"] + x["b"][:, :3]), P,
                                {"a": X, "b": X[:5]}, Y), "same leading size"),
    "integer_param_leaf": (lambda: fisher_diagonal(fn, {**P, "n": jnp.ones(3, jnp.int32)}, X, Y),
                           "only float leaves"),
    "non_finite_inputs": (lambda: fisher_diagonal(fn, P, X.at[0, 0].set(jnp.nan), Y),
                          "non-finite importance"),
    "leaf_mask_wrong_keys": (lambda: fisher_diagonal(fn, P, X, Y, leaf_mask={"v": True}),
                             "leaf_mask"),
    "plan_of_nnx_module": (lambda: fisher_plan(fn, _nnx_model(False), X), "nnx.Module"),
    # --- streaming and any likelihood.
    "batches_as_one_array": (lambda: fisher_from_batches(fn, P, X), "iterable of batches"),
    "batch_without_labels": (lambda: fisher_from_batches(fn, P, [X]), "must be (inputs, labels)"),
    "no_batches": (lambda: fisher_from_batches(fn, P, []), "gave no examples"),
    "max_examples_zero": (lambda: fisher_from_batches(fn, P, [(X, Y)], max_examples=0),
                          "`max_examples`"),
    "accumulator_probabilities": (
        lambda: fisher_accumulator(lambda p, x: jax.nn.softmax(fn(p, x))).update(
            fisher_accumulator(fn).init(P), P, X, Y), "returned probabilities"),
    "nll_per_class": (lambda: fisher_from_nll(lambda p, b: fn(p, b["x"]), P, [BATCH]),
                      "one negative log-likelihood per row"),
    "nll_sample_without_key": (lambda: fisher_from_nll(_nll, P, [BATCH], sample_fn=_bad_sample),
                               "`key`"),
    "nll_num_samples_zero": (lambda: fisher_from_nll(_nll, P, [BATCH], num_samples=0),
                             "`num_samples`"),
    "nll_sample_changes_structure": (
        lambda: fisher_from_nll(_nll, P, [BATCH], sample_fn=_bad_sample, key=jax.random.key(0)),
        "same structure"),
    "nll_batches_as_dict": (lambda: fisher_from_nll(_nll, P, BATCH), "iterable of batches"),
    # --- the penalty.
    "lam_string": (lambda: ewc_loss(P, (Anchor(P, F),), lam="1e3"), "lam=float('1e3')"),
    "lam_negative": (lambda: ewc_loss(P, (Anchor(P, F),), lam=-1.0), "`lam` should be >= 0"),
    "lam_nan": (lambda: ewc_loss(P, (Anchor(P, F),), lam=float("nan")), "`lam`"),
    "p_zero": (lambda: ewc_loss(P, (Anchor(P, F),), lam=1.0, p=0.0), "`p` should be positive"),
    "anchor_inside_loss": (_anchor_inside_loss, "being differentiated"),
    "pairs_inside_loss": (_pairs_inside_loss, "very parameters"),
    "nnx_module_to_ewc_loss": (
        lambda: ewc_loss(_nnx_model(False), (Anchor(nnx.state(_nnx_model(False), nnx.Param),
                                                    ABS(nnx.state(_nnx_model(False), nnx.Param))),),
                         lam=1.0), "nnx.state(model, nnx.Param)"),
    "anchor_of_nnx_module": (lambda: Anchor(params=_nnx_model(False), importance=F),
                             "nnx.Module"),
    "linen_variables_to_ewc_loss": (lambda: ewc_loss(LV, (Anchor(LV["params"], ABS(LV["params"])),),
                                                     lam=1.0), "linen's collections"),
    "bare_anchor": (lambda: ewc_loss(P, Anchor(P, F), lam=1.0), "as a sequence"),
    "anchors_as_dict": (lambda: ewc_loss(P, {"a": Anchor(P, F)}, lam=1.0), "must be a sequence"),
    "negative_importance": (lambda: Anchor(P, jax.tree.map(lambda a: -a, F)), "finite and >= 0"),
    "anchor_of_other_model": (lambda: ewc_loss(P, (Anchor({"v": jnp.ones(2)}, {"v": jnp.ones(2)}),),
                                               lam=1.0), "does not match"),
    "stack_nothing": (lambda: stack_anchors([]), "at least one Anchor"),
    # --- a Fisher over no counted example (a mean over none).
    "fisher_mask_all_zero": (lambda: fisher_diagonal(fn, P, X, Y, mask=jnp.zeros(6)),
                             "`mask` counts no example"),
    "fisher_label_mask_all_zero": (
        lambda: fisher_diagonal(fn, P, X, Y, label_mask=jnp.zeros(6)),
        "`label_mask` counts no example"),
    "fisher_stream_every_batch_masked": (
        lambda: fisher_from_batches(fn, P, [(X, Y, jnp.zeros(6))]), "counts no label position"),
    "fisher_accumulator_result_of_nothing": (
        lambda: fisher_accumulator(fn).result(fisher_accumulator(fn).init(P)),
        "counted no example"),
    "anchor_importance_of_other_shape": (lambda: Anchor(P, {**F, "w": jnp.ones((3, 1))}),
                                         "`Anchor.importance` does not match `Anchor.params`"),
    # --- the optax transformation.
    "transform_lam_string": (lambda: add_ewc_gradient((Anchor(P, F),), lam="10"), "string"),
    "transform_without_lam": (
        lambda: add_ewc_gradient((Anchor(P, F),)).update(P, optax.EmptyState(), P), "needs λ"),
    "transform_without_params": (
        lambda: add_ewc_gradient((Anchor(P, F),), lam=1.0).update(P, optax.EmptyState()),
        "needs `params`"),
    "transform_both_masks": (lambda: add_ewc_gradient(mask={"w": True, "b": True},
                                                      leaf_mask={"w": True, "b": True}),
                             "not both"),
    "transform_negative_update_lam": (
        lambda: add_ewc_gradient().update(P, optax.EmptyState(), P, ewc_anchors=(Anchor(P, F),),
                                          ewc_lam=-2.0), "`ewc_lam` should be >= 0"),
}


def test_a_traced_negative_lam_makes_the_transformations_updates_nan():
  """Under jit a λ cannot raise: a negative one gives NaN updates, not a silent push away from
  the anchor; a valid traced λ the eager updates."""
  tx = add_ewc_gradient()
  update = jax.jit(lambda lam: tx.update(P, optax.EmptyState(), P, ewc_anchors=(Anchor(
      jax.tree.map(jnp.zeros_like, P), F),), ewc_lam=lam)[0])
  assert all(np.all(np.isnan(u)) for u in jax.tree.leaves(update(-2.0)))
  eager = tx.update(P, optax.EmptyState(), P, ewc_anchors=(Anchor(jax.tree.map(jnp.zeros_like, P),
                                                                  F),), ewc_lam=2.0)[0]
  for got, want in zip(jax.tree.leaves(update(2.0)), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(got, want)


def test_a_traced_mask_that_counts_nothing_gives_nan_importance():
  """Under jit the mask cannot raise: a mean over no row is NaN (refused by an Anchor, NaN in
  the loss), never a silent zero importance; a mask with rows gives the eager numbers."""
  f = jax.jit(lambda m: fisher_diagonal(fn, P, X, Y, mask=m))
  assert all(np.all(np.isnan(v)) for v in jax.tree.leaves(f(jnp.zeros(6))))
  for got, want in zip(jax.tree.leaves(f(jnp.ones(6))), jax.tree.leaves(fisher_diagonal(fn, P, X,
                                                                                         Y))):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_the_table_is_large():
  assert len(CASES) >= 50


@pytest.mark.parametrize("name", sorted(CASES))
def test_misuse_gives_one_clear_message(name):
  call, needle = CASES[name]
  with pytest.raises(Exception) as info:
    call()
  message = str(info.value)
  assert needle in message, message
  if not name.endswith("under_jit"):
    assert info.type is ValueError, (info.type, message)
