"""Pillow plots: valid, non-blank PNGs of a sensible size, written atomically; bad input refused."""

import numpy as np
import pytest
from PIL import Image

from experiments import plots

TITLE = ("Split MNIST (task-incremental), ewc, λ=1000, fisher=exact, seeds=0,1,2,3,4 "
         "and some more words")


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
  return len(img.getcolors(maxcolors=1 << 20))


def most_common_non_white(img: Image.Image) -> tuple:
  return max((c for c in img.getcolors(maxcolors=1 << 20) if c[1] != (255, 255, 255)))[1]


@pytest.mark.parametrize("t", [1, 5, 20])
def test_heatmap_writes_a_non_blank_png(tmp_path, t):
  path = tmp_path / "acc_matrix.png"
  plots.accuracy_heatmap(sample(t), path, TITLE)
  img = load(path)
  assert 600 <= img.width <= 1000 and 300 <= img.height <= 1000
  assert distinct_colours(img) > 20
  assert sorted(p.name for p in tmp_path.iterdir()) == ["acc_matrix.png"]  # no temporary file


def test_heatmap_grows_with_the_number_of_tasks_up_to_a_cap(tmp_path):
  sizes = []
  for t in (5, 20, 50):
    plots.accuracy_heatmap(sample(t), tmp_path / f"{t}.png", "title")
    sizes.append(load(tmp_path / f"{t}.png").size)
  assert sizes[0][0] < sizes[1][0] and sizes[0][1] < sizes[1][1]
  assert all(w <= 1000 and h <= 1000 for w, h in sizes)  # capped: smaller cells at T = 50


def test_heatmap_cell_colour_follows_the_value(tmp_path):
  plots.accuracy_heatmap(np.ones((2, 2)), tmp_path / "high.png", "all 100 %")
  plots.accuracy_heatmap(np.zeros((2, 2)), tmp_path / "low.png", "all 0 %")
  high = most_common_non_white(load(tmp_path / "high.png"))
  low = most_common_non_white(load(tmp_path / "low.png"))
  assert high == tuple(plots.colormap(1.0)) and low == tuple(plots.colormap(0.0))
  assert high != low


def test_colormap_is_viridis_at_the_anchors_and_grey_for_nan():
  assert tuple(plots.colormap(0.0)) == plots.VIRIDIS[0]
  assert tuple(plots.colormap(1.0)) == plots.VIRIDIS[-1]
  assert tuple(plots.colormap(0.5)) == plots.VIRIDIS[4]
  assert tuple(plots.colormap(-3.0)) == plots.VIRIDIS[0]  # clipped to the range
  assert plots.colormap(np.zeros((3, 4))).shape == (3, 4, 3)
  assert tuple(plots.colormap(np.nan)) == plots.MISSING


@pytest.mark.parametrize("t", [1, 5, 20])
@pytest.mark.parametrize("with_std", [False, True])
def test_over_training_writes_a_non_blank_png(tmp_path, t, with_std):
  path = tmp_path / "accuracy_over_training.png"
  std = np.full((t, t), 0.03) if with_std else None
  plots.accuracy_over_training(sample(t), std, path, TITLE)
  img = load(path)
  assert 700 <= img.width <= 1000 and 400 <= img.height <= 700
  assert distinct_colours(img) > 20
  assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_over_training.png"]


def test_over_training_draws_the_std_band(tmp_path):
  acc = sample(5)
  plots.accuracy_over_training(acc, None, tmp_path / "plain.png", "t")
  plots.accuracy_over_training(acc, np.full((5, 5), 0.1), tmp_path / "band.png", "t")
  plain = np.asarray(load(tmp_path / "plain.png"), dtype=int)
  band = np.asarray(load(tmp_path / "band.png"), dtype=int)
  assert plain.shape == band.shape
  assert (np.abs(plain - band).sum(-1) > 30).sum() > 1000  # a visible translucent area


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

  def broken_save(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(Image.Image, "save", broken_save)
  with pytest.raises(OSError, match="disk full"):
    plots.accuracy_heatmap(sample(3), path, "t")
  assert path.read_bytes() == b"old"
  assert [p.name for p in tmp_path.iterdir()] == ["acc_matrix.png"]


def test_titles_are_wrapped_and_spelled_with_the_fonts_glyphs():
  font = plots._font(16)  # pylint: disable=protected-access
  assert plots._printable("ewc, λ=1000 ± 0.5, café", font) == "ewc, lambda=1000 ± 0.5, cafe"
  lines = plots._wrap(TITLE, font, 300)  # pylint: disable=protected-access
  assert len(lines) > 1 and " ".join(lines) == TITLE
  assert all(plots._text_size(font, line)[0] <= 300 for line in lines)


# --- average accuracy of a sweep ---------------------------------------------------------------

LAMS = [1, 10, 100, 1000, 10000]
SWEEP = [("p=1", LAMS, [97.1, 98.0, 98.9, 99.1, 98.2], [0.1, 0.2, 0.4, 0.3, 0.2]),
         ("p=2", LAMS, [96.5, 97.6, 98.6, 99.0, 98.4], [0.3, 0.2, 0.25, 0.15, 0.4])]


def sweep_png(tmp_path, lines, log_x=True, name="average_accuracy.png") -> Image.Image:
  plots.average_accuracy_sweep(lines, "λ", log_x, tmp_path / name, TITLE)
  return load(tmp_path / name)


def frame_right(img: Image.Image) -> int:
  """x of the plot frame's right edge: the rightmost column that is mostly black."""
  dark = (np.asarray(img.convert("L")) < 60).sum(axis=0)
  return int(np.flatnonzero(dark > 300)[-1])


@pytest.mark.parametrize("lines,log_x", [
    ([(None, LAMS, SWEEP[0][2], SWEEP[0][3])], True),  # one series, log x, no legend
    (SWEEP, True),  # two series with a legend
    ([("lr=0.001", [1e-3, 3e-3, 1e-2], [97, 98.5, 98], [0.2, 0.1, 0.3])], True),  # < 1 decade
    ([("gamma", [0.0, 0.5, 1.0], [96, 97, 97.5], [0.5, 0.1, 0.3])], False),  # linear, x = 0
    ([(None, [1000], [98.7], [0.2])], True),  # a single point
    ([(None, [0.0], [98.7], [0.0])], False),  # a single point at 0, no error
])
def test_sweep_writes_a_non_blank_png(tmp_path, lines, log_x):
  img = sweep_png(tmp_path, lines, log_x)
  assert img.size[0] == plots.PLOT_WIDTH and 450 <= img.height <= 600
  assert distinct_colours(img) > 20
  assert sorted(p.name for p in tmp_path.iterdir()) == ["average_accuracy.png"]


def test_sweep_legend_only_for_labelled_series(tmp_path):
  labelled = sweep_png(tmp_path, SWEEP, name="a.png")
  unlabelled = sweep_png(tmp_path, [(None, *s[1:]) for s in SWEEP], name="b.png")
  assert frame_right(labelled) < frame_right(unlabelled) - 60  # the legend takes the right side
  assert frame_right(unlabelled) > plots.PLOT_WIDTH - 40


def test_sweep_draws_error_bars(tmp_path):
  bars = np.asarray(sweep_png(tmp_path, SWEEP[:1], name="a.png"), dtype=int)
  none = np.asarray(sweep_png(tmp_path, [(*SWEEP[0][:3], [0.0] * 5)], name="b.png"), dtype=int)
  assert bars.shape == none.shape
  assert (np.abs(bars - none).sum(-1) > 30).sum() > 100  # the bars and their caps


def test_sweep_nan_leaves_a_gap(tmp_path):
  ys = [97.1, np.nan, 98.9, 99.1, 98.2]
  gap = sweep_png(tmp_path, [(None, LAMS, ys, [0.1, np.nan, 0.4, 0.3, np.nan])], name="a.png")
  assert distinct_colours(gap) > 20
  blank = sweep_png(tmp_path, [(None, LAMS, [np.nan] * 5, [np.nan] * 5)], name="b.png")
  assert distinct_colours(blank) > 5  # axes (0-100), labels and title still drawn


def test_sweep_y_axis_is_tightened_to_the_data():  # pylint: disable=protected-access
  ticks = plots._accuracy_ticks(plots._sweep_series(SWEEP, True))
  lo, hi = ticks[0][0], ticks[-1][0]
  assert 94 <= lo <= 96.2 - 0.3 and 99.4 <= hi <= 100  # error bars inside, margin kept
  assert 4 <= len(ticks) <= 8
  one = plots._accuracy_ticks(plots._sweep_series([(None, [1], [98.7], [0])], True))
  assert one[-1][0] - one[0][0] >= 1 and one[0][0] < 98.7 < one[-1][0]
  wide = [(None, [1], [10], [0]), (None, [1], [100], [5])]
  full = plots._accuracy_ticks(plots._sweep_series(wide, True))
  assert full[0][0] == 0 and full[-1][0] == 100  # clamped to 0-100
  nan = plots._accuracy_ticks(plots._sweep_series([(None, [1], [np.nan], [np.nan])], True))
  assert [v for v, _ in nan] == [0, 20, 40, 60, 80, 100]


@pytest.mark.parametrize("xs,labels", [
    (LAMS, ["1", "10", "100", "1000", "10000"]),  # the powers of ten
    ([1e-3, 3e-3, 1e-2], ["0.001", "0.003", "0.01"]),  # few decades: the values too
    ([1e-8, 1e8], ["1e-8", "1e-6", "0.0001", "0.01", "1", "100", "10000", "1e6", "1e8"]),
])
def test_sweep_log_ticks(xs, labels):  # pylint: disable=protected-access
  xs = np.asarray(xs, dtype=float)
  lo, hi = plots._x_range(xs, log_x=True)
  axes = plots._Axes(left=90, top=50, width=690, height=380, x_lo=lo, x_hi=hi, log_x=True)
  ticks, minor = plots._sweep_x_ticks(axes, plots._font(12), xs)
  assert [label for _, label in ticks] == labels
  assert all(lo <= x <= hi for x in minor) and minor


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


def test_sweep_module_plot_groups_rows(tmp_path):
  """experiments.sweep.plot_average_accuracy (in a subprocess: importing it defines flags)."""
  code = f"""
import types
from experiments import sweep
rows = [{{"lam": l, "p": p, "seeds": [0, 1], "average_accuracy": a, "average_accuracy_std": 0.002}}
        for p in (1.0, 2.0) for l, a in [(1.0, 0.97), (1000.0, 0.99), (10.0, 0.98)]]
base = types.SimpleNamespace(lam=0.0, p=1.0, lr=1e-3, gamma=1.0)
sweep.plot_average_accuracy(rows, ("lam", "p", "seed"), base, r"{tmp_path}/two.png", "t")
one = [{{"seeds": [0], "average_accuracy": 0.97, "average_accuracy_std": 0.0}}]
sweep.plot_average_accuracy(one, ("seed",), base, r"{tmp_path}/lam0.png", "t")  # lam=0: linear
"""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from pathlib import Path  # pylint: disable=import-outside-toplevel
  proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert frame_right(load(tmp_path / "two.png")) < plots.PLOT_WIDTH - 60  # a legend: p=1, p=2
  assert distinct_colours(load(tmp_path / "lam0.png")) > 20
