import numpy as np
import pytest

from ewc_jax.continual import metrics

R = np.array([[0.9, 0.1, 0.2],
              [0.8, 0.95, 0.3],
              [0.7, 0.85, 0.99]])


def test_average_accuracy_is_last_row_mean():
  assert metrics.average_accuracy(R) == pytest.approx((0.7 + 0.85 + 0.99) / 3)


def test_backward_transfer():
  assert metrics.backward_transfer(R) == pytest.approx(((0.7 - 0.9) + (0.85 - 0.95)) / 2)


def test_forgetting_uses_best_earlier_accuracy():
  r = np.array([[0.5, 0, 0], [0.9, 0.8, 0], [0.6, 0.7, 1.0]])
  assert metrics.forgetting(r) == pytest.approx([0.9 - 0.6, 0.8 - 0.7])


def test_single_task():
  s = metrics.summarize([[0.97]])
  assert s == {"average_accuracy": 0.97, "bwt": 0.0, "forgetting": [], "mean_forgetting": 0.0}


@pytest.mark.parametrize("bad", [[], [[1, 2]], [1, 2, 3]])
def test_rejects_non_square(bad):
  with pytest.raises(ValueError, match="acc_matrix"):
    metrics.average_accuracy(bad)
