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
