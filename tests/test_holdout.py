"""The validation split: held out of the training data, fixed, never the test set."""

import dataclasses

import numpy as np
import pytest

from ewc_jax import continual, heads
from ewc_jax.continual import holdout
from tests.test_continual import CFG, T, synthetic_tasks


def _rows(data, t):
  return {bytes(r) for r in np.asarray(data.inputs[t, :int(data.counts[t])])}


def test_split_partitions_each_task_and_is_fixed():
  data = synthetic_tasks(200, 0)
  fit, val = holdout.split(data, 0.2, seed=0)
  again_fit, again_val = holdout.split(data, 0.2, seed=0)
  for t in range(T):
    n = int(data.counts[t])
    assert int(val.counts[t]) == round(0.2 * n) and int(fit.counts[t]) + int(val.counts[t]) == n
    a, b, whole = _rows(fit, t), _rows(val, t), _rows(data, t)
    assert a | b == whole and not a & b
  for x, y in zip(fit + val, again_fit + again_val):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  _, other = holdout.split(data, 0.2, seed=1)
  assert _rows(other, 0) != _rows(val, 0)


def test_split_never_holds_out_test_rows():
  train, test = synthetic_tasks(200, 0), synthetic_tasks(100, 100)
  _, val = holdout.split(train, 0.25)
  for t in range(T):
    assert _rows(val, t) <= _rows(train, t)
    assert not _rows(val, t) & (_rows(test, t) - _rows(train, t))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 1.5])
def test_split_refuses_bad_fractions(fraction):
  with pytest.raises(ValueError, match="validation_fraction"):
    holdout.split(synthetic_tasks(50, 0), fraction)


def test_run_reports_a_validation_matrix_the_same_for_every_seed():
  cfg = dataclasses.replace(CFG, validation_fraction=0.2, epochs=1)
  net = heads.task_incremental(T, 2, hidden=cfg.hidden)
  train, test = synthetic_tasks(200, 0), synthetic_tasks(100, 100)
  a = continual.run(cfg, net, train, test)
  b = continual.run(cfg, net, train, test)
  assert a.val_acc_matrix.shape == (T, T)
  np.testing.assert_array_equal(a.val_acc_matrix, b.val_acc_matrix)
  assert not np.array_equal(a.val_acc_matrix, a.acc_matrix)
  # Training on 80% of the data differs from training on all of it.
  full = continual.run(dataclasses.replace(cfg, validation_fraction=0.0), net, train, test)
  assert full.val_acc_matrix is None
  assert not np.array_equal(full.acc_matrix, a.acc_matrix)
  # Which rows are held out does not depend on the run's seed.
  fit0, val0 = holdout.split(train, 0.2, cfg.validation_seed)
  assert dataclasses.replace(cfg, seed=5).validation_seed == cfg.validation_seed
  assert int(val0.counts.sum()) == sum(round(0.2 * int(n)) for n in np.asarray(train.counts))


def test_sweep_ranks_by_validation_accuracy():
  from ewc_jax.continual import sweep  # pylint: disable=import-outside-toplevel
  base = dataclasses.replace(CFG, validation_fraction=0.2, epochs=1)
  net = heads.task_incremental(T, 2, hidden=base.hidden)
  configs = sweep.grid(base, lam=[1.0, 1e4], seed=[0, 1])
  result = sweep.run(configs, net, synthetic_tasks(200, 0), synthetic_tasks(100, 100))
  assert result.val_acc_matrix.shape == (4, T, T)
  rows = sweep.table(result)
  vals = [r["val_average_accuracy"] for r in rows]
  assert vals == sorted(vals, reverse=True)
  assert "val AA" in sweep.format_table(rows, ["lam"])
