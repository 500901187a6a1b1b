"""experiments.fisher_kinds: the blog's Fisher-kind table from sweep results (synthetic files)."""

import json
import math

import pytest

from experiments import fisher_kinds


def _write(folder, table, configs):
  folder.mkdir(parents=True)
  (folder / "results.json").write_text(json.dumps(
      {"table": table, "configs": configs, "timings": {"total": 12.5},
       "environment": {"jax": "x"}}))


def test_row_takes_the_final_seeds_and_the_validation_grid(tmp_path):
  _write(tmp_path / "select_true", [
      {"lam": 1e4, "seeds": [0], "val_average_accuracy": 0.98, "average_accuracy": 0.97},
      {"lam": 1e3, "seeds": [0], "val_average_accuracy": 0.95, "average_accuracy": 0.96}], [])
  _write(tmp_path / "extend_true_1e8", [
      {"lam": 1e8, "seeds": [0], "val_average_accuracy": 0.90, "average_accuracy": 0.91}], [])
  _write(tmp_path / "final_true_s01", [], [
      {"seed": 0, "lam": 1e4, "average_accuracy": 0.99},
      {"seed": 1, "lam": 1e4, "average_accuracy": 0.98}])
  _write(tmp_path / "final_true_s2", [], [{"seed": 2, "lam": 1e4, "average_accuracy": 0.97}])
  row = fisher_kinds.kind_row(tmp_path, "true")
  assert [r["lam"] for r in row["selection"]] == [1e3, 1e4, 1e8]
  assert row["chosen_lam"] == 1e4 and row["seeds"] == [0, 1, 2]
  assert row["mean"] == pytest.approx(98.0)
  assert row["sem"] == pytest.approx(1.0 / math.sqrt(3))           # std 1 (ddof 1) / √3
  assert row["difference"] == pytest.approx(98.0 - 99.12)
  assert row["z"] == pytest.approx((98.0 - 99.12) / math.sqrt(1 / 3 + 0.16 ** 2))
  assert row["within_2_blog_sem"] is False
  assert fisher_kinds.kind_row(tmp_path, "sampled") is None        # nothing run
  assert "| EXACT | `--fisher=true` | 10000 | 98.00 ± 0.58 (3)" in fisher_kinds.markdown([row])
  table = fisher_kinds.selection_markdown([row])
  assert "1e+03: 95.00, **1e+04: 98.00**, 1e+08: 90.00" in table
  assert row["std"] == pytest.approx(1.0) and row["blog"]["std"] == pytest.approx(0.16 * 30 ** .5)


def test_shuffled_row_reads_the_shuffled_sweep(tmp_path):
  _write(tmp_path / "shuffled_true500", [], [
      {"seed": 0, "lam": 1e7, "average_accuracy": 0.99},
      {"seed": 1, "lam": 1e7, "average_accuracy": 0.97}])
  row = fisher_kinds.shuffled_row(tmp_path, "true500")
  assert row["flags"].endswith("--shuffle_classes") and row["seeds"] == [0, 1]
  assert row["mean"] == pytest.approx(98.0) and row["chosen_lam"] == 1e7
  assert fisher_kinds.shuffled_row(tmp_path, "true") is None
