"""matplotlib plots: valid, non-blank PNGs, written atomically; bad input refused first."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import files, plots

TITLE = "Split MNIST (task-incremental), ewc, λ=1000, fisher=empirical, seeds=0,1,2"


def sample(t: int, seed: int = 0) -> np.ndarray:
  """A typical R: ~99 on the diagonal, 95-100 below it, 40-60 above it."""
  r = np.random.default_rng(seed)
  acc = np.where(np.tri(t, dtype=bool), r.uniform(0.95, 1.0, (t, t)),
                 r.uniform(0.4, 0.6, (t, t)))
  np.fill_diagonal(acc, 0.99)
  return acc


def load(path) -> Image.Image:
  with Image.open(path) as img:
    assert img.format == "PNG"
    img.load()
    return img.convert("RGB")


def distinct_colours(img: Image.Image) -> int:
  return len(img.getcolors(maxcolors=1 << 22))


@pytest.mark.parametrize("t", [1, 5, 25])
def test_heatmap_writes_a_non_blank_png(tmp_path, t):
  path = tmp_path / "acc_matrix.png"
  plots.accuracy_heatmap(sample(t), path, TITLE)
  img = load(path)
  assert 200 <= img.width <= 2000 and 200 <= img.height <= 2000
  assert distinct_colours(img) > 20
  assert [p.name for p in tmp_path.iterdir()] == ["acc_matrix.png"]  # no temporary left


def test_heatmap_shows_the_values_in_percent():
  fig = plots.heatmap_figure(np.array([[0.991, 0.5], [0.97, 0.98]]), "t")
  texts = sorted(t.get_text() for t in fig.axes[0].texts)
  assert texts == ["50.0", "97.0", "98.0", "99.1"]
  assert fig.axes[0].images[0].get_clim() == (0, 100)


@pytest.mark.parametrize("with_std", [False, True])
@pytest.mark.parametrize("t", [1, 5, 12])
def test_over_training_writes_a_non_blank_png(tmp_path, t, with_std):
  std = np.full((t, t), 0.01) if with_std else None
  plots.accuracy_over_training(sample(t), std, tmp_path / "o.png", TITLE)
  assert distinct_colours(load(tmp_path / "o.png")) > 20


def test_over_training_draws_one_line_per_task_and_the_std_band():
  fig = plots.over_training_figure(sample(4), np.full((4, 4), 0.02), "t")
  ax = fig.axes[0]
  assert len(ax.lines) == 4 and len(ax.collections) == 4  # a band per task
  np.testing.assert_allclose(ax.lines[1].get_ydata(), 100 * sample(4)[1:, 1])
  assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"task {j}" for j in range(1, 5)]
  fig = plots.over_training_figure(sample(3), None, "t")
  assert not fig.axes[0].collections


def test_non_finite_values_do_not_break_the_plots(tmp_path):
  acc = sample(4)
  acc[2, 1] = np.nan
  plots.accuracy_heatmap(acc, tmp_path / "h.png", "nan")
  plots.accuracy_over_training(acc, np.full((4, 4), np.nan), tmp_path / "o.png", "nan")
  assert distinct_colours(load(tmp_path / "h.png")) > 20
  assert distinct_colours(load(tmp_path / "o.png")) > 20


@pytest.mark.parametrize("shape", [(2, 3), (4,), (0, 0), (2, 2, 2)])
def test_non_square_acc_is_refused(tmp_path, shape):
  acc = np.zeros(shape)
  with pytest.raises(ValueError, match="acc"):
    plots.accuracy_heatmap(acc, tmp_path / "h.png", "t")
  with pytest.raises(ValueError, match="acc"):
    plots.accuracy_over_training(acc, None, tmp_path / "o.png", "t")
  assert not list(tmp_path.iterdir())


def test_std_of_another_shape_is_refused(tmp_path):
  with pytest.raises(ValueError, match="std"):
    plots.accuracy_over_training(sample(3), np.zeros((2, 2)), tmp_path / "o.png", "t")
  assert not list(tmp_path.iterdir())


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / "acc_matrix.png"
  path.write_bytes(b"old")
  real = files.os.fsync

  def broken_fsync(fd):
    real(fd)
    raise OSError("disk full")

  monkeypatch.setattr(files.os, "fsync", broken_fsync)
  with pytest.raises(OSError, match="disk full"):
    plots.accuracy_heatmap(sample(3), path, "t")
  assert path.read_bytes() == b"old"
  assert [p.name for p in tmp_path.iterdir()] == ["acc_matrix.png"]


# --- average accuracy of a sweep ---------------------------------------------------------------

LAMS = [1, 10, 100, 1000, 10000]
SWEEP = [("p=1", LAMS, [97.1, 98.0, 98.9, 99.1, 98.2], [0.1, 0.2, 0.4, 0.3, 0.2]),
         ("p=2", LAMS, [96.5, 97.6, 98.6, 99.0, 98.4], [0.3, 0.2, 0.25, 0.15, 0.4])]


@pytest.mark.parametrize("lines,log_x", [
    ([(None, LAMS, SWEEP[0][2], SWEEP[0][3])], True),  # one series, log x, no legend
    (SWEEP, True),  # two series with a legend
    ([("gamma", [0.0, 0.5, 1.0], [96, 97, 97.5], [0.5, 0.1, 0.3])], False),  # linear, x = 0
    ([(None, [1000], [98.7], [0.2])], True),  # a single point
    ([(None, LAMS, [97.1, np.nan, 98.9, 99.1, 98.2], [0.1, np.nan, 0.4, 0.3, np.nan])], True),
])
def test_sweep_writes_a_non_blank_png(tmp_path, lines, log_x):
  plots.average_accuracy_sweep(lines, "λ", log_x, tmp_path / "a.png", TITLE)
  assert distinct_colours(load(tmp_path / "a.png")) > 20
  assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_sweep_figure_axes_legend_and_limits():
  fig = plots.sweep_figure(SWEEP, "λ", True, "t")
  ax = fig.axes[0]
  assert ax.get_xscale() == "log"
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["p=1", "p=2"]
  lo, hi = ax.get_ylim()
  assert 94 <= lo < 96.2 and 99.4 < hi <= 100  # tightened to the data, error bars inside
  unlabelled = plots.sweep_figure([(None, *s[1:]) for s in SWEEP], "λ", False, "t")
  assert unlabelled.axes[0].get_legend() is None and unlabelled.axes[0].get_xscale() == "linear"


def test_accuracy_limits():
  assert plots.accuracy_limits(plots._sweep_series([(None, [1], [np.nan], [np.nan])], True)) \
      == (0.0, 100.0)
  lo, hi = plots.accuracy_limits(plots._sweep_series([(None, [1], [98.7], [0])], True))
  assert hi - lo >= 1 and lo < 98.7 < hi
  wide = [(None, [1], [10], [0]), (None, [1], [100], [5])]
  lo, hi = plots.accuracy_limits(plots._sweep_series(wide, True))
  assert 0 <= lo < 10 and hi == 100  # clamped to 0-100


@pytest.mark.parametrize("lines,log_x,needle", [
    ([], True, "lines"),
    ("abc", True, "lines"),
    ([(None, [1, 2])], True, r"lines\[0\]"),
    ([(None, [1, 2], [97], [0.1, 0.1])], True, r"lines\[0\] ys"),
    ([(None, [1, 2], [97, 98], [0.1])], True, r"lines\[0\] errs"),
    ([(None, [], [], [])], True, r"lines\[0\] xs"),
    ([(None, ["a"], [97], [0.1])], True, r"lines\[0\] xs"),
    ([(None, [1, np.nan], [97, 98], [0.1, 0.1])], False, r"lines\[0\] xs.*finite"),
    ([SWEEP[0], (None, [0, 1], [97, 98], [0.1, 0.1])], True, r"log_x.*lines\[1\]"),
    ([(None, [1, 2], [97, 150], [0.1, 0.1])], True, r"lines\[0\] ys.*percent"),
    ([(None, [1, 2], [97, 98], [0.1, -0.1])], True, r"lines\[0\] errs"),
])
def test_sweep_bad_input_is_refused(tmp_path, lines, log_x, needle):
  with pytest.raises(ValueError, match=needle):
    plots.average_accuracy_sweep(lines, "λ", log_x, tmp_path / "a.png", "t")
  assert not list(tmp_path.iterdir())


def test_sweep_plot_groups_rows(tmp_path):
  """experiments.train_sweep.plot_average_accuracy: one line per other swept value; λ = 0 gives
  a linear axis."""
  import types  # pylint: disable=import-outside-toplevel
  from experiments import train_sweep  # pylint: disable=import-outside-toplevel
  rows = [{"lam": lam, "p": p, "seeds": [0, 1], "average_accuracy": a,
           "average_accuracy_std": 0.002}
          for p in (1.0, 2.0) for lam, a in [(1.0, 0.97), (1000.0, 0.99), (10.0, 0.98)]]
  base = types.SimpleNamespace(lam=0.0, p=1.0, lr=1e-3, gamma=1.0)
  train_sweep.plot_average_accuracy(rows, ("lam", "p", "seed"), base, tmp_path / "two.png", "t")
  one = [{"seeds": [0], "average_accuracy": 0.97, "average_accuracy_std": 0.0}]
  train_sweep.plot_average_accuracy(one, ("seed",), base, tmp_path / "lam0.png", "t")
  assert distinct_colours(load(tmp_path / "two.png")) > 20
  assert distinct_colours(load(tmp_path / "lam0.png")) > 20


def test_matplotlib_is_imported_only_for_plots():
  code = ("import sys; from experiments import plots; a = 'matplotlib' in sys.modules; "
          "plots.prefetch().join(); print(a, 'matplotlib.pyplot' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=120, check=True).stdout.split()
  assert out == ["False", "True"]
