"""benchmarks/fisher_models.py's models at tiny sizes: the Fisher of each equals brute force.

The benchmark's own builders (``BUILDERS`` with the ``TINY`` sizes) make every model family it
times (the runner's MLP and ResNet-18, the BatchNorm CNN, the NNX transformer and ViT block);
``fisher_diagonal`` on each (several batches, a padded last one) must equal the brute-force
``jax.vmap(jax.grad(per-example loss))`` Fisher, and each train-mode loss must run.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks import fisher_models as fm
from ewc_jax import fisher_diagonal, num_parameters


def test_every_benchmarked_model_has_a_tiny_size():
  assert set(fm.MODELS) == set(fm.BUILDERS) == set(fm.TINY) == set(fm.SIZES) == set(
      fm.QUICK_SIZES)
  assert all(n % fm.BATCH == 0 for n in list(fm.SIZES.values()) + list(fm.QUICK_SIZES.values()))


# The ResNet-18, the transformer and the ViT block (30, 16 and 17 s here) are checked by the
# benchmark itself (max_rel_error) and, as layer families, by tests/test_fisher_conv.py and
# tests/test_per_example.py (strided and grouped convolutions, the NNX language model with
# attention, LayerNorm and position parameters); the default suite keeps to its time budget.
@pytest.mark.parametrize("name", ["mlp", "cnn_bn"])
def test_fisher_of_each_model_equals_vmap_grad(name):
  model = fm.BUILDERS[name](**fm.TINY[name])
  x, y = model.data(jax.random.key(1), 12)
  got = fisher_diagonal(model.logits_fn, model.params, x, y, kind="empirical", batch_size=5)
  ref = fm.reference_fisher(model.logits_fn, model.params, x, y)
  report = fm.error_report(got, ref)
  assert report["max_rel_error"] <= 1e-5, report
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(got))

  plan = fm.plan_summary(model, x)
  assert plan["parameters"] == num_parameters(model.params) > 0
  assert plan["fast_path_share"] == 1.0, plan
  assert len(plan["vmap_leaves"]) == plan["leaves_by_method"].get("vmap", 0)

  # The train-mode loss the benchmark's train step differentiates (BatchNorm batch statistics,
  # NNX dropout with its RNG state carried).
  (loss, state), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
      model.params, model.state, x[:4], y[:4], jax.random.key(0))
  assert np.isfinite(float(loss))
  assert jax.tree.structure(state) == jax.tree.structure(model.state)
  assert jax.tree.structure(grads) == jax.tree.structure(model.params)


def test_error_report_floors_leaves_that_are_zero_up_to_rounding():
  ref = {"a": np.array([1.0, 2.0]), "b": np.array([1e-20, 0.0])}
  got = {"a": np.array([1.0, 2.0 + 2e-6]), "b": np.array([3e-20, 0.0])}
  report = fm.error_report(got, ref)
  assert report["floored_leaves"] == ["['b']"]
  np.testing.assert_allclose(report["max_rel_error"], 1e-6)
  assert report["worst_leaf"] == "['a']"


def test_judge_and_table_read_a_row():
  row = {"model": "mlp", "parameters": 10, "fast_path_share": 1.0, "examples": 128,
         "epoch_s": 1.0, "fisher_jit_over_epoch": 0.5, "fisher_eager_over_epoch": 1.2,
         "memory_ratio": 1.0, "max_rel_error": 1e-7}
  row["passes"] = fm.judge(row)
  assert row["passes"] == {"fast_path_share": True, "fisher_eager_over_epoch": False,
                           "fisher_jit_over_epoch": True, "memory_ratio": True,
                           "max_rel_error": True}
  assert fm.judge({**row, "model": "cnn_bn"})["fisher_eager_over_epoch"]
  text = fm.table([row])
  assert "mlp" in text and " x" in text
