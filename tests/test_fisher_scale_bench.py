"""benchmarks/fisher_scale.py's pure pieces at tiny sizes, in-process (no timing asserted): the
streamed data, one measurement's fields, and the linearity / flatness / device summaries."""

from __future__ import annotations

import dataclasses
import types

import jax
import numpy as np
import pytest

from benchmarks import fisher_scale as fs

TINY = fs.Config("tiny", d_model=16, layers=1, heads=2, mlp=32, seq=8, vocab=11, batch=8,
                 sizes=(20, 40), device_examples=0)


def test_full_configuration_is_the_issues():
  assert fs.FULL.layers >= 4 and fs.FULL.d_model == 256 and fs.FULL.seq == 128
  assert fs.FULL.sizes == (1000, 10000, 50000) and fs.FULL.devices == 8
  for config in (fs.FULL, fs.QUICK):
    assert fs._config_from(dataclasses.asdict(config)) == config
    last = [n % config.batch or config.batch for n in config.sizes + (config.device_examples,)]
    assert config.batch % config.devices == 0 and all(b % config.devices == 0 for b in last)


def test_batches_stream_next_token_pairs():
  key = jax.random.key(3)
  gen = fs.batches(key, 20, TINY)
  assert isinstance(gen, types.GeneratorType)   # drawn when asked for, not held whole
  got = list(gen)
  assert [x.shape for x, _ in got] == [(8, 8), (8, 8), (4, 8)]
  assert all(y.shape == x.shape and x.dtype == y.dtype == np.int32 for x, y in got)
  for x, y in got:
    np.testing.assert_array_equal(np.asarray(x)[:, 1:], np.asarray(y)[:, :-1])  # next tokens
    assert 0 <= int(x.min()) and int(y.max()) < TINY.vocab
  again = list(fs.batches(key, 12, TINY))                 # a prefix: the same first rows
  np.testing.assert_array_equal(np.asarray(again[0][0]), np.asarray(got[0][0]))
  np.testing.assert_array_equal(np.asarray(again[1][1]), np.asarray(got[1][1])[:4])
  assert not np.array_equal(np.asarray(got[0][0]), np.asarray(got[1][0]))


def test_warmup_covers_a_second_batch_and_the_last_size():
  assert fs.warmup_examples(TINY, 20) == 8 + 4
  assert fs.warmup_examples(TINY, 16) == 8 + 8
  assert fs.warmup_examples(TINY, 3) == 8 + 3


def test_model_is_a_token_level_language_model():
  logits_fn, params = fs.build(TINY)
  x, _ = next(fs.batches(jax.random.key(0), 3, TINY))
  assert jax.eval_shape(logits_fn, params, x).shape == (3, TINY.seq, TINY.vocab)


def test_measure_returns_the_fields():
  row = fs.measure(TINY, 20)
  assert row["examples"] == 20 and row["devices"] == 1 and row["batches"] == 3
  assert row["warmup_examples"] == 12                 # a full batch and one of the last size (4)
  assert row["fisher_s"] > 0 and row["warmup_s"] > 0 and row["examples_per_s"] > 0
  assert row["fisher_cpu_s"] > 0 and row["warmup_cpu_s"] > 0
  np.testing.assert_allclose(row["s_per_example"] * 20, row["fisher_s"])
  assert row["compiles_in_timed_call"] == 0 and row["compile_s_in_timed_call"] == 0
  assert row["peak_rss_mb"] >= row["peak_rss_warmup_mb"] > 0
  if row["stream_peak_rss_mb"] is not None:    # Linux: the timed call's own peak
    assert row["peak_rss_mb"] >= row["stream_peak_rss_mb"] >= row["rss_stream_start_mb"] > 0
    assert row["stream_growth_mb"] >= 0
  assert row["fisher_finite"] and row["fisher_sum"] > 0
  assert "vmap" not in row["leaves_by_method"] and row["parameters"] > 0
  with pytest.raises(ValueError, match="devices"):
    fs.measure(TINY, 20, devices=len(jax.devices()) + 1)


def test_scaling_summary_on_fake_numbers():
  rows = [{"examples": n, "fisher_s": 2.0 + 0.01 * n, "fisher_cpu_s": 0.02 * n,
           "stream_peak_rss_mb": rss, "peak_rss_mb": rss + whole}
          for n, rss, whole in ((4000, 105.0, 0.0), (1000, 100.0, 50.0), (16000, 108.0, 0.0))]
  out = fs.scaling(rows)
  assert out["examples"] == [1000, 4000, 16000]
  np.testing.assert_allclose(out["s_per_example"], [0.012, 0.0105, 0.010125])
  np.testing.assert_allclose(out["s_per_example_max_over_min"], 0.012 / 0.010125)
  np.testing.assert_allclose(out["s_per_example_vs_smallest"][0], 1.0)
  np.testing.assert_allclose(out["fit_fisher_s"]["intercept_s"], 2.0)
  np.testing.assert_allclose(out["fit_fisher_s"]["s_per_example"], 0.01)
  np.testing.assert_allclose(out["cpu_s_per_example"], [0.02] * 3)
  np.testing.assert_allclose(out["cpu_s_per_example_max_over_min"], 1.0)
  assert out["rss_measured"] == "stream_peak_rss_mb" and out["rss_mb"] == [100.0, 105.0, 108.0]
  np.testing.assert_allclose(out["rss_max_over_min"], 1.08)
  assert out["rss_flat_within_10pct"]
  np.testing.assert_allclose(out["whole_process_peak_rss_max_over_min"], 150 / 105)
  rows[2]["stream_peak_rss_mb"] = 115.0
  assert not fs.scaling(rows)["rss_flat_within_10pct"]
  for row in rows:                        # no resettable peak: the whole process's is judged
    row["stream_peak_rss_mb"] = None
  out = fs.scaling(rows)
  assert out["rss_measured"] == "peak_rss_mb" and not out["rss_flat_within_10pct"]


def test_device_ratio_on_fake_numbers():
  one = {"devices": 1, "examples": 1000, "fisher_s": 2.0, "fisher_sum": 10.0}
  many = {"devices": 8, "examples": 1000, "fisher_s": 3.0, "fisher_sum": 10.0 + 1e-5}
  out = fs.device_ratio(one, many)
  assert out["devices"] == [1, 8] and out["time_ratio_many_over_one"] == 1.5
  np.testing.assert_allclose(out["speedup"], 2 / 3)
  np.testing.assert_allclose(out["fisher_sum_rel_diff"], 1e-6)


def test_estimate_on_fake_numbers():
  row = {"examples": 8, "warmup_s": 10.0, "fisher_s": 4.0, "warmup_cpu_s": 20.0,
         "fisher_cpu_s": 6.0}
  config = dataclasses.replace(TINY, sizes=(20, 40), device_examples=16)
  out = fs.estimate(config, row, device_time_ratio=0.5)
  assert out["children"] == 4 and out["timed_examples"] == 20 + 40 + 16 * 1.5
  np.testing.assert_allclose(out["wall"]["warmup_s"], 40.0)
  np.testing.assert_allclose(out["wall"]["fisher_s"], 0.5 * 84)       # 4 s / 8 rows per row
  np.testing.assert_allclose(out["wall"]["total_s"], 40.0 + 42.0)
  np.testing.assert_allclose(out["cpu"]["total_s"], 80.0 + 0.75 * 84)
  assert out["wall"]["fisher_s_by_size"] == {"20": 10.0, "40": 20.0}
  no_devices = fs.estimate(dataclasses.replace(config, device_examples=0), row)
  assert no_devices["children"] == 2 and no_devices["timed_examples"] == 60
