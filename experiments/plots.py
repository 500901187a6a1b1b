"""PNG plots drawn with Pillow: a run's accuracy-matrix heatmap and accuracy over training, and a
sweep's average accuracy against a hyperparameter.

Pillow rather than a plotting library: importing one and rendering a run's two figures took
~0.7 s of a ~7 s command-line run; these take a few hundredths of a second. Lines, markers and
error bars are drawn at twice the size and downsampled (anti-aliasing), text is drawn at the
final size. The PNGs are written atomically (a temporary file in the same folder, then
``os.replace``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from experiments import files

# The viridis colour map at 0, 1/8, ..., 1; linear interpolation in between.
VIRIDIS = ((68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140),
           (40, 174, 128), (94, 201, 98), (173, 220, 48), (253, 231, 37))
# The tab10 (Tableau 10) palette, cycled for the lines.
TAB10 = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
         (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
BLACK = (0, 0, 0)
WHITE = (255, 255, 255)
GREY = (110, 110, 110)
GRID = (222, 222, 222)
MISSING = (200, 200, 200)  # heatmap cell of a non-finite value
LEGEND_TASKS = 10  # accuracy_over_training lists at most this many tasks in its legend
SCALE = 2  # supersampling factor of the line plot's lines, markers and bands
# Pillow's built-in font has a small character set (no Greek, no accents): ASCII spellings of
# characters a title may hold that it lacks (others: accents stripped, else "?").
SUBSTITUTES = types.MappingProxyType({
    "λ": "lambda", "γ": "gamma", "σ": "sigma", "μ": "mu", "µ": "mu", "α": "alpha", "β": "beta",
    "θ": "theta", "Δ": "Delta", "±": "+/-", "×": "x", "–": "-", "—": "-", "→": "->", "≥": ">=",
    "≤": "<=", "…": "...", "·": "-"})


# --- input checks, colours, text --------------------------------------------------------------

def _square(a, name: str) -> np.ndarray:
  """``a`` as a float T x T array (T >= 1); ValueError naming ``name`` otherwise."""
  arr = np.asarray(a, dtype=float)
  if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
    raise ValueError(f"{name} must be a square 2-D array (T x T accuracies, T >= 1), "
                     f"got shape {arr.shape}")
  return arr


def _same_shape(a, shape: tuple, name: str) -> np.ndarray | None:
  """``a`` (or None) as a float array of ``shape``; ValueError naming ``name`` otherwise."""
  if a is None:
    return None
  arr = np.asarray(a, dtype=float)
  if arr.shape != shape:
    raise ValueError(f"{name} must have the shape of acc {shape}, got shape {arr.shape}")
  return arr


def colormap(values: np.ndarray) -> np.ndarray:
  """Viridis colours (uint8 RGB, shape ``values.shape + (3,)``) of values in [0, 1]; NaN: grey."""
  v = np.asarray(values, dtype=float)
  anchors = np.asarray(VIRIDIS, dtype=float)
  stops = np.linspace(0.0, 1.0, len(VIRIDIS))
  clipped = np.clip(np.nan_to_num(v, nan=0.0), 0.0, 1.0)
  rgb = np.stack([np.interp(clipped, stops, anchors[:, c]) for c in range(3)], axis=-1)
  rgb = np.where(np.isfinite(v)[..., None], rgb, np.asarray(MISSING, dtype=float))
  return np.round(rgb).astype(np.uint8)


def _font(size: float) -> ImageFont.FreeTypeFont:
  """Pillow's built-in scalable font (needs Pillow >= 10.1 with FreeType)."""
  return ImageFont.load_default(size=size)


def _printable(text: str, font: ImageFont.FreeTypeFont) -> str:
  """``text`` with each character that ``font`` lacks spelled in ASCII (λ -> lambda, é -> e)."""
  notdef = font.getmask("\ue000")  # a private-use character: the font's "missing glyph" box
  missing = (notdef.size, bytes(notdef))
  out = []
  for ch in text:
    mask = font.getmask(ch) if not ch.isascii() else None
    if mask is None or (mask.size, bytes(mask)) != missing:
      out.append(ch)
      continue
    ascii_ = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode()
    out.append(SUBSTITUTES.get(ch) or ascii_ or "?")
  return "".join(out)


def _text_size(font: ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
  left, top, right, bottom = font.getbbox(text)
  return right - left, bottom - top


def _fitting_prefix(word: str, font: ImageFont.FreeTypeFont, width: int) -> int:
  """Length of the longest prefix of ``word`` at most ``width`` px wide (at least 1)."""
  n = 1
  while n < len(word) and _text_size(font, word[:n + 1])[0] <= width:
    n += 1
  return n


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
  """Greedy word wrap to lines at most ``width`` px wide (an overlong word is cut)."""
  lines: list[str] = []
  line = ""
  for word in text.split():
    candidate = f"{line} {word}" if line else word
    if _text_size(font, candidate)[0] <= width:
      line = candidate
      continue
    if line:
      lines.append(line)
    while _text_size(font, word)[0] > width and len(word) > 1:
      cut = _fitting_prefix(word, font, width)
      lines.append(word[:cut])
      word = word[cut:]
    line = word
  if line:
    lines.append(line)
  return lines or [""]


def _fit_title(title: str, width: int, size: int) -> tuple[ImageFont.FreeTypeFont, list[str]]:
  """The largest font (``size`` down to 10 px) that fits ``title`` in two lines of ``width``."""
  title = _printable(title, _font(size))
  for s in range(size, 9, -1):
    font = _font(s)
    lines = _wrap(title, font, width)
    if len(lines) <= 2:
      return font, lines
  return font, lines


def _title_height(font: ImageFont.FreeTypeFont, lines: list[str]) -> int:
  return len(lines) * _line_height(font)


def _line_height(font: ImageFont.FreeTypeFont) -> int:
  return int(math.ceil(font.size * 1.3))


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], font: ImageFont.FreeTypeFont,
                center_x: float, top: float) -> None:
  """Centred text lines from ``top`` down."""
  for k, line in enumerate(lines):
    draw.text((center_x, top + k * _line_height(font)), line, font=font, fill=BLACK, anchor="mt")


def _vertical_text(img: Image.Image, text: str, font: ImageFont.FreeTypeFont,
                   center: tuple[float, float], fill=BLACK) -> None:
  """``text`` rotated 90° counter-clockwise (reading upwards), centred on ``center``."""
  w, h = _text_size(font, text)
  mask = Image.new("L", (w + 8, h + 8), 0)
  ImageDraw.Draw(mask).text(((w + 8) / 2, (h + 8) / 2), text, font=font, fill=255, anchor="mm")
  mask = mask.rotate(90, expand=True)
  x = int(round(center[0] - mask.width / 2))
  y = int(round(center[1] - mask.height / 2))
  img.paste(Image.new(img.mode, mask.size, fill), (x, y), mask)


def _tick_step(spacing: float, label_width: float) -> int:
  """Label every k-th tick (k in 1, 2, 5, 10, 20, 50, ...) so that labels do not overlap."""
  k, decade = 1, 1
  while k * spacing < label_width + 6:
    k = {1: 2, 2: 5, 5: 10}[k // decade] * decade
    decade = 10 ** (len(str(k)) - 1)
  return k


def _tick_values(t: int, step: int) -> list[int]:
  """1..t every ``step`` (multiples of ``step``, and 1 when it is far enough from them)."""
  if step == 1:
    return list(range(1, t + 1))
  return ([1] if step >= 5 else []) + list(range(step, t + 1, step))


def _save_png(img: Image.Image, path: Path) -> None:
  files.write_atomic(path, lambda f: img.save(f, format="PNG"))


# --- the heatmap -------------------------------------------------------------------------------

def _cell_font(cell: int) -> ImageFont.FreeTypeFont | None:
  """The largest font (<= 14 px) whose "100.0" fits a cell; None when cells are < 28 px."""
  if cell < 28:
    return None
  for size in range(14, 7, -1):
    font = _font(size)
    if _text_size(font, "100.0")[0] <= cell - 6:
      return font
  return None


def _draw_cells(img: Image.Image, pct: np.ndarray, x0: int, y0: int, cell: int) -> None:
  """The T x T cells coloured by value (0-100 %), labelled when they are large enough."""
  t = pct.shape[0]
  cells = Image.fromarray(colormap(pct / 100.0), mode="RGB")
  img.paste(cells.resize((t * cell, t * cell), Image.Resampling.NEAREST), (x0, y0))
  font = _cell_font(cell)
  if font is None:
    return
  draw = ImageDraw.Draw(img)
  for i in range(t):
    for j in range(t):
      v = pct[i, j]
      label = f"{v:.1f}" if math.isfinite(v) else "nan"
      colour = WHITE if math.isfinite(v) and v < 60 else BLACK
      draw.text((x0 + (j + 0.5) * cell, y0 + (i + 0.5) * cell), label, font=font, fill=colour,
                anchor="mm")


def _draw_colorbar(img: Image.Image, x0: int, y0: int, width: int, height: int,
                   font: ImageFont.FreeTypeFont, label_font: ImageFont.FreeTypeFont) -> None:
  """Vertical viridis bar for 0-100 %, ticks every 20 and the rotated label on its right."""
  ramp = colormap(np.linspace(1.0, 0.0, height))[:, None, :].repeat(width, axis=1)
  img.paste(Image.fromarray(ramp, mode="RGB"), (x0, y0))
  draw = ImageDraw.Draw(img)
  draw.rectangle((x0, y0, x0 + width - 1, y0 + height - 1), outline=BLACK)
  for v in range(0, 101, 20):
    y = y0 + (height - 1) * (1 - v / 100)
    draw.line((x0 + width - 1, y, x0 + width + 3, y), fill=BLACK)
    draw.text((x0 + width + 6, y), str(v), font=font, fill=BLACK, anchor="lm")
  label_x = x0 + width + 8 + _text_size(font, "100")[0] + 6 + _line_height(label_font) / 2
  _vertical_text(img, "test accuracy (%)", label_font, (label_x, y0 + height / 2))


def _draw_matrix_ticks(draw: ImageDraw.ImageDraw, t: int, x0: int, y0: int, cell: int,
                       font: ImageFont.FreeTypeFont) -> None:
  """Tick marks and labels 1..T below (tested on task j) and left of (after task i) the grid."""
  step = _tick_step(cell, _text_size(font, str(t))[0])
  for k in _tick_values(t, step):
    c = (k - 0.5) * cell
    draw.line((x0 + c, y0 + t * cell, x0 + c, y0 + t * cell + 4), fill=BLACK)
    draw.text((x0 + c, y0 + t * cell + 6), str(k), font=font, fill=BLACK, anchor="mt")
    draw.line((x0 - 5, y0 + c, x0 - 1, y0 + c), fill=BLACK)
    draw.text((x0 - 7, y0 + c), str(k), font=font, fill=BLACK, anchor="rm")


def _heatmap_image(pct: np.ndarray, title: str) -> Image.Image:
  """The whole heatmap figure of a T x T matrix in percent."""
  t = pct.shape[0]
  cell = max(14, min(720 // t, max(100, 300 // t)))  # grid 300-720 px (700 at T = 50)
  grid = t * cell
  tick_font, label_font = _font(12), _font(14)
  tick_w = _text_size(tick_font, str(t))[0]
  left = 12 + _line_height(label_font) + 8 + tick_w + 8
  bar_gap, bar_w = 24, 22
  right = bar_gap + bar_w + 8 + _text_size(tick_font, "100")[0] + 6 + _line_height(label_font) + 12
  width = max(620, left + grid + right)
  title_font, title_lines = _fit_title(title, width - 24, 16)
  top = 12 + _title_height(title_font, title_lines) + 12
  bottom = 8 + _line_height(tick_font) + 8 + _line_height(label_font) + 10
  height = top + grid + bottom
  x0 = left + (width - left - grid - right) // 2  # centre the content when the title is wider
  img = Image.new("RGB", (width, height), WHITE)
  draw = ImageDraw.Draw(img)
  _draw_lines(draw, title_lines, title_font, width / 2, 12)
  _draw_cells(img, pct, x0, top, cell)
  draw.rectangle((x0 - 1, top - 1, x0 + grid, top + grid), outline=BLACK)
  _draw_matrix_ticks(draw, t, x0, top, cell, tick_font)
  draw.text((x0 + grid / 2, top + grid + 8 + _line_height(tick_font) + 8), "tested on task j",
            font=label_font, fill=BLACK, anchor="mt")
  _vertical_text(img, "after training task i", label_font,
                 (x0 - 8 - tick_w - 8 - _line_height(label_font) / 2, top + grid / 2))
  _draw_colorbar(img, x0 + grid + bar_gap, top, bar_w, grid, tick_font, label_font)
  return img


def accuracy_heatmap(acc: np.ndarray, path: Path, title: str) -> None:
  """R[i, j] (rows: after training task i; columns: tested on task j), in percent, as a PNG."""
  pct = 100 * _square(acc, "acc")
  _save_png(_heatmap_image(pct, title), path)


# --- line plots: axes, ticks, legend and the figure around the data ---------------------------

PLOT_WIDTH = 880  # px, the line plots' figure width
PLOT_HEIGHT = 380  # px, the height of their plot area


@dataclasses.dataclass(frozen=True)
class _Axes:
  """The plot area in pixels (final size) and the data ranges it shows."""
  left: int
  top: int
  width: int
  height: int
  x_lo: float
  x_hi: float
  y_lo: float = 0.0
  y_hi: float = 100.0
  pad: int = 6  # px between the y range and the frame, so points at its ends stay inside
  log_x: bool = False  # x_lo, x_hi and the x values are then > 0

  def px(self, x: float) -> float:
    f = math.log10 if self.log_x else float
    lo, hi = f(self.x_lo), f(self.x_hi)
    return self.left + (f(x) - lo) / (hi - lo) * self.width

  def py(self, y: float) -> float:
    span = self.height - 2 * self.pad
    return self.top + self.pad + (self.y_hi - y) / (self.y_hi - self.y_lo) * span


# A legend row: (label, colour or None for a grey note, swatch: "line", "dashed" or "errorbar").
_Entry = tuple[str, "tuple | None", str]
_Ticks = list[tuple[float, str]]  # (value, label)


@dataclasses.dataclass(frozen=True)
class _Chart:
  """What a line plot shows around its data (which a callback draws)."""
  title: str
  x_label: str
  y_label: tuple[str, ...]  # one or two lines
  x_range: tuple[float, float]
  y_ticks: tuple[tuple[float, str], ...]  # the y range runs from the first to the last
  legend: tuple[_Entry, ...] = ()
  log_x: bool = False
  x_grid: bool = False  # vertical grid lines at the labelled x ticks


def _scaled(points, k: int = SCALE) -> list[tuple[float, float]]:
  return [(x * k, y * k) for x, y in points]


def _finite_runs(xs: np.ndarray, ys: np.ndarray) -> list[list[tuple[float, float]]]:
  """The (x, y) points split into runs of consecutive finite y (NaNs break a line)."""
  runs: list[list[tuple[float, float]]] = [[]]
  for x, y in zip(xs, ys):
    if math.isfinite(y):
      runs[-1].append((float(x), float(y)))
    elif runs[-1]:
      runs.append([])
  return [r for r in runs if r]


def _dashed(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], fill, width: int,
            dash: float, gap: float) -> None:
  """A dashed polyline; the dash pattern continues across its vertices."""
  phase = 0.0  # distance already walked in the current dash + gap period
  for (xa, ya), (xb, yb) in zip(points, points[1:]):
    length = math.hypot(xb - xa, yb - ya)
    pos = 0.0
    while pos < length:
      in_dash = phase < dash
      step = min((dash - phase) if in_dash else (dash + gap - phase), length - pos)
      if in_dash:
        f0, f1 = pos / length, (pos + step) / length
        draw.line((xa + f0 * (xb - xa), ya + f0 * (yb - ya), xa + f1 * (xb - xa),
                   ya + f1 * (yb - ya)), fill=fill, width=width)
      pos += step
      phase = (phase + step) % (dash + gap)


def _draw_series(draw: ImageDraw.ImageDraw, points, colour, radius: float,
                 k: int = SCALE) -> None:
  """A solid line with round markers of ``radius`` px, on the supersampled canvas."""
  pts = _scaled(points, k)
  if len(pts) > 1:
    draw.line(pts, fill=colour, width=2 * k, joint="curve")
  r = radius * k
  for x, y in pts if r > 0 else ():
    draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)


def _draw_error_bar(draw: ImageDraw.ImageDraw, x: float, y_top: float, y_bottom: float, colour,
                    caps: tuple[bool, bool] = (True, True), k: int = SCALE) -> None:
  """A vertical bar from ``y_top`` to ``y_bottom`` (px) with 4 px caps, on the 2x canvas."""
  draw.line((x * k, y_top * k, x * k, y_bottom * k), fill=colour, width=3)
  for y, cap in zip((y_top, y_bottom), caps):
    if cap:
      draw.line(((x - 4) * k, y * k, (x + 4) * k, y * k), fill=colour, width=3)


def _legend_width(entries, font: ImageFont.FreeTypeFont) -> int:
  """The figure width right of the plot area that a legend of ``entries`` takes."""
  return 24 + 34 + max(_text_size(font, label)[0] for label, _, _ in entries) + 16


def _draw_legend_swatches(canvas: Image.Image, x0: int, y0: int, row_h: int, entries) -> None:
  """The legend's line samples (with markers or error bars) on the 2x canvas."""
  k = SCALE
  draw = ImageDraw.Draw(canvas)
  for r, (_, colour, swatch) in enumerate(entries):
    y = y0 + 8 + (r + 0.5) * row_h
    if colour is None:
      continue
    if swatch == "dashed":
      _dashed(draw, _scaled([(x0 + 8, y), (x0 + 38, y)]), colour, 3 * k, dash=9 * k, gap=5 * k)
      continue
    _draw_series(draw, [(x0 + 8, y), (x0 + 38, y)], colour, radius=0)
    _draw_series(draw, [(x0 + 23, y)], colour, radius=3.2)
    if swatch == "errorbar":
      _draw_error_bar(draw, x0 + 23, y - 6, y + 6, colour)


def _draw_legend_text(draw: ImageDraw.ImageDraw, x0: int, y0: int, width: int, row_h: int,
                      entries, font: ImageFont.FreeTypeFont) -> None:
  """The legend's frame and labels (notes in grey), at the final size."""
  draw.rectangle((x0, y0, x0 + width, y0 + 16 + len(entries) * row_h), outline=(190, 190, 190))
  for r, (label, colour, _) in enumerate(entries):
    draw.text((x0 + (46 if colour else 10), y0 + 8 + (r + 0.5) * row_h), label, font=font,
              fill=BLACK if colour else GREY, anchor="lm")


def _draw_grid_lines(draw: ImageDraw.ImageDraw, axes: _Axes, ys, xs, k: int = SCALE) -> None:
  """Light horizontal grid lines at ``ys`` and vertical ones at ``xs``, on the 2x canvas."""
  right, bottom = axes.left + axes.width, axes.top + axes.height
  for v in ys:
    y = round(axes.py(v)) * k
    draw.line((axes.left * k, y, right * k, y), fill=GRID, width=k)
  for v in xs:
    x = round(axes.px(v)) * k
    draw.line((x, axes.top * k, x, bottom * k), fill=GRID, width=k)


def _draw_ticks(draw: ImageDraw.ImageDraw, axes: _Axes, x_ticks: _Ticks, x_minor,
                y_ticks, font: ImageFont.FreeTypeFont) -> None:
  """Tick marks and labels below and left of the plot area; unlabelled short minor x ticks."""
  bottom = axes.top + axes.height
  for x, label in x_ticks:
    draw.line((axes.px(x), bottom, axes.px(x), bottom + 4), fill=BLACK)
    draw.text((axes.px(x), bottom + 6), label, font=font, fill=BLACK, anchor="mt")
  for x in x_minor:
    draw.line((axes.px(x), bottom, axes.px(x), bottom + 2), fill=BLACK)
  for v, label in y_ticks:
    y = axes.py(v)
    draw.line((axes.left - 5, y, axes.left - 1, y), fill=BLACK)
    draw.text((axes.left - 7, y), label, font=font, fill=BLACK, anchor="rm")


def _chart_layout(chart: _Chart, fonts):
  """Figure size, title lines and the plot area of a line plot."""
  tick_font, label_font, legend_font = fonts
  title_font, title_lines = _fit_title(chart.title, PLOT_WIDTH - 24, 16)
  top = 12 + _title_height(title_font, title_lines) + 12
  legend_w = _legend_width(chart.legend, legend_font) if chart.legend else 24
  tick_w = max(_text_size(tick_font, label)[0] for _, label in chart.y_ticks)
  left = 12 + len(chart.y_label) * _line_height(label_font) + 8 + tick_w + 8
  axes = _Axes(left=left, top=top, width=PLOT_WIDTH - left - legend_w, height=PLOT_HEIGHT,
               x_lo=chart.x_range[0], x_hi=chart.x_range[1], y_lo=chart.y_ticks[0][0],
               y_hi=chart.y_ticks[-1][0], log_x=chart.log_x)
  height = top + PLOT_HEIGHT + 8 + _line_height(tick_font) + 8 + _line_height(label_font) + 10
  return (PLOT_WIDTH, height), (title_font, title_lines), axes


def _line_plot(chart: _Chart, x_ticks, draw_data) -> Image.Image:
  """The whole figure: ``x_ticks(axes, font)`` gives the (labelled ticks, minor tick values);
  ``draw_data(canvas, axes)`` draws the data on the supersampled canvas."""
  fonts = tick_font, label_font, legend_font = _font(12), _font(14), _font(12)
  (width, height), (title_font, title_lines), axes = _chart_layout(chart, fonts)
  labelled, minor = x_ticks(axes, tick_font)
  canvas = Image.new("RGB", (width * SCALE, height * SCALE), WHITE)
  draw = ImageDraw.Draw(canvas)
  _draw_grid_lines(draw, axes, [v for v, _ in chart.y_ticks],
                   [x for x, _ in labelled] if chart.x_grid else [])
  draw_data(canvas, axes)
  k = SCALE
  draw.rectangle((axes.left * k, axes.top * k, (axes.left + axes.width + 1) * k - 1,
                  (axes.top + axes.height + 1) * k - 1), outline=BLACK, width=k)
  row_h = _line_height(legend_font) + 4
  legend_x, legend_y = axes.left + axes.width + 14, axes.top
  if chart.legend:
    _draw_legend_swatches(canvas, legend_x, legend_y, row_h, chart.legend)
  img = canvas.reduce(SCALE)  # box-filter downsampling: the anti-aliasing
  draw = ImageDraw.Draw(img)
  if chart.legend:
    _draw_legend_text(draw, legend_x, legend_y, width - legend_x - 8, row_h, chart.legend,
                      legend_font)
  _draw_lines(draw, title_lines, title_font, width / 2, 12)
  _draw_ticks(draw, axes, labelled, minor, chart.y_ticks, tick_font)
  bottom = axes.top + axes.height
  draw.text((axes.left + axes.width / 2, bottom + 8 + _line_height(tick_font) + 8),
            _printable(chart.x_label, label_font), font=label_font, fill=BLACK, anchor="mt")
  for n, line in enumerate(chart.y_label):
    _vertical_text(img, _printable(line, label_font), label_font,
                   (12 + (n + 0.5) * _line_height(label_font), axes.top + axes.height / 2))
  return img


# --- accuracy over training --------------------------------------------------------------------

def _draw_band(canvas: Image.Image, points_lo, points_hi, colour, k: int = SCALE) -> None:
  """A translucent band between two polylines (same x), alpha-composited onto RGB ``canvas``."""
  outline = _scaled(list(points_hi) + list(points_lo)[::-1], k)
  if len(points_hi) == 1:  # one point: a small bar, like an error bar
    (x, y_hi), (_, y_lo) = points_hi[0], points_lo[0]
    outline = _scaled([(x - 3, y_hi), (x + 3, y_hi), (x + 3, y_lo), (x - 3, y_lo)], k)
  xs, ys = [p[0] for p in outline], [p[1] for p in outline]
  x0, y0 = int(math.floor(min(xs))), int(math.floor(min(ys)))
  box = (x0, y0, int(math.ceil(max(xs))) + 2, int(math.ceil(max(ys))) + 2)
  layer = Image.new("RGBA", (box[2] - x0, box[3] - y0))
  ImageDraw.Draw(layer).polygon([(x - x0, y - y0) for x, y in outline], fill=(*colour, 46))
  region = Image.alpha_composite(canvas.crop(box).convert("RGBA"), layer)
  canvas.paste(region.convert("RGB"), box[:2])


def _legend_entries(t: int) -> list[_Entry]:
  """Legend rows: the tasks (at most 10 listed), then the mean."""
  rows = [(f"task {j + 1}", TAB10[j % len(TAB10)], "line") for j in range(min(t, LEGEND_TASKS))]
  if t > LEGEND_TASKS:
    rows.append((f"(tasks {LEGEND_TASKS + 1}-{t} not listed)", None, "line"))
  return rows + [("mean of seen tasks", BLACK, "dashed")]


def _seen_mean(pct: np.ndarray) -> np.ndarray:
  """Mean accuracy over the tasks seen so far, after each training task: mean of R[i, :i+1]."""
  return np.array([np.mean(pct[i, :i + 1]) for i in range(pct.shape[0])])


def _draw_data(canvas: Image.Image, axes: _Axes, pct: np.ndarray, std: np.ndarray | None) -> None:
  """± std bands, one line per task and the dashed mean, on the 2x canvas."""
  t = pct.shape[0]
  draw = ImageDraw.Draw(canvas)
  x = np.arange(1, t + 1)
  if std is not None:
    for j in range(t):
      lo = np.clip(pct[j:, j] - std[j:, j], 0, 100)
      hi = np.clip(pct[j:, j] + std[j:, j], 0, 100)
      for run_lo, run_hi in zip(_finite_runs(x[j:], lo), _finite_runs(x[j:], hi)):
        _draw_band(canvas, [(axes.px(a), axes.py(b)) for a, b in run_lo],
                   [(axes.px(a), axes.py(b)) for a, b in run_hi], TAB10[j % len(TAB10)])
  radius = min(3.2, max(1.5, (axes.px(2) - axes.px(1)) / 6))  # smaller when points crowd
  for j in range(t):
    for run in _finite_runs(x[j:], np.clip(pct[j:, j], 0, 100)):
      _draw_series(draw, [(axes.px(a), axes.py(b)) for a, b in run], TAB10[j % len(TAB10)],
                   radius)
  for run in _finite_runs(x, np.clip(_seen_mean(pct), 0, 100)):
    pts = _scaled([(axes.px(a), axes.py(b)) for a, b in run])
    _dashed(draw, pts, BLACK, 3 * SCALE, dash=9 * SCALE, gap=5 * SCALE)


def _over_training_image(pct: np.ndarray, std: np.ndarray | None, title: str) -> Image.Image:
  """The whole accuracy-over-training figure (values in percent)."""
  t = pct.shape[0]
  pad_x = max(0.35, 0.025 * t)
  chart = _Chart(title=title, x_label="after training task", y_label=("test accuracy (%)",),
                 x_range=(1 - pad_x, t + pad_x),
                 y_ticks=tuple((v, str(v)) for v in range(0, 101, 20)),
                 legend=tuple(_legend_entries(t)))

  def x_ticks(axes: _Axes, font):
    step = _tick_step(axes.width / max(axes.x_hi - axes.x_lo, 1), _text_size(font, str(t))[0])
    return [(k, str(k)) for k in _tick_values(t, step)], []

  return _line_plot(chart, x_ticks, lambda canvas, axes: _draw_data(canvas, axes, pct, std))


def accuracy_over_training(acc: np.ndarray, std: np.ndarray | None, path: Path,
                           title: str) -> None:
  """One line per task j: its test accuracy after each training task i >= j (± std), as a PNG."""
  acc = _square(acc, "acc")
  std = _same_shape(std, acc.shape, "std")
  _save_png(_over_training_image(100 * acc, None if std is None else 100 * std, title),
                   path)


# --- average accuracy of a hyperparameter sweep -----------------------------------------------

_Series = tuple[str | None, np.ndarray, np.ndarray, np.ndarray]  # label, xs, ys, errs


def _vector(values, name: str, length: int | None = None) -> np.ndarray:
  """``values`` as a 1-D float array (of ``length``); ValueError naming ``name`` otherwise."""
  try:
    arr = np.asarray(values, dtype=float)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a sequence of numbers, got {values!r:.60}") from None
  if arr.ndim != 1 or arr.size == 0 or (length is not None and arr.size != length):
    want = f"{length} values like xs" if length is not None else "at least one value"
    raise ValueError(f"{name} must be 1-D with {want}, got shape {arr.shape}")
  return arr


def _sweep_series(lines, log_x: bool) -> list[_Series]:
  """The checked series, each sorted by x; ValueError naming the argument at fault."""
  if isinstance(lines, (str, bytes)) or not lines:
    raise ValueError("lines must be a non-empty list of (label, xs, ys, errs) series")
  out = []
  for i, series in enumerate(lines):
    try:
      label, xs, ys, errs = series
    except (TypeError, ValueError):
      raise ValueError(f"lines[{i}] must be a (label, xs, ys, errs) tuple") from None
    xs = _vector(xs, f"lines[{i}] xs")
    ys = _vector(ys, f"lines[{i}] ys", xs.size)
    errs = _vector(errs, f"lines[{i}] errs", xs.size)
    if not np.isfinite(xs).all():
      raise ValueError(f"lines[{i}] xs must be finite, got {xs.tolist()}")
    if log_x and (xs <= 0).any():
      raise ValueError(f"log_x needs xs > 0 (a log axis), lines[{i}] xs holds "
                       f"{xs[xs <= 0][0]:g}; pass log_x=False")
    if ((ys < 0) | (ys > 100)).any():  # NaN compares False: allowed (a gap)
      raise ValueError(f"lines[{i}] ys must be accuracies in percent (0-100), got {ys.tolist()}")
    if (errs < 0).any():
      raise ValueError(f"lines[{i}] errs must be >= 0 (standard deviations), got {errs.tolist()}")
    order = np.argsort(xs, kind="stable")
    out.append((None if label is None else str(label), xs[order], ys[order], errs[order]))
  return out


def _step(span: float, max_intervals: int) -> tuple[float, int]:
  """The smallest step 1, 2 or 5 x 10^e giving at most ``max_intervals`` in ``span``, and the
  number of decimals its multiples need."""
  raw = span / max_intervals
  e = math.floor(math.log10(raw))
  m = next((m for m in (1, 2, 5) if m * 10.0 ** e >= raw * (1 - 1e-9)), None)
  if m is None:
    m, e = 1, e + 1
  return m * 10.0 ** e, max(0, -e)


def _multiples(lo: float, hi: float, step: float, decimals: int) -> _Ticks:
  """The multiples of ``step`` in [lo, hi], labelled with ``decimals`` decimals."""
  first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
  return [(round(i * step, decimals), f"{i * step:.{decimals}f}") for i in range(first, last + 1)]


def _accuracy_ticks(series: list[_Series]) -> tuple[tuple[float, str], ...]:
  """y ticks (percent) tightened to the data and error bars with an 8 % margin, at least 1
  point wide, ending on ticks, within 0-100; 0-100 in steps of 20 when nothing is finite."""
  ends = [v for _, _, ys, errs in series for y, e in zip(ys, np.nan_to_num(errs))
          if math.isfinite(y) for v in (y - e, y + e)]
  if not ends:
    return tuple((v, str(v)) for v in range(0, 101, 20))
  lo, hi = max(0.0, min(ends)), min(100.0, max(ends))
  margin = 0.08 * (hi - lo)
  lo, hi = lo - margin, hi + margin
  if hi - lo < 1:
    lo, hi = (lo + hi) / 2 - 0.5, (lo + hi) / 2 + 0.5
  step, decimals = _step(hi - lo, 7)
  lo = max(0.0, math.floor(lo / step + 1e-9) * step)
  hi = min(100.0, math.ceil(hi / step - 1e-9) * step)
  return tuple(_multiples(lo, hi, step, decimals))


def _x_range(xs: np.ndarray, log_x: bool) -> tuple[float, float]:
  """The data's x range with 6 % margins (of decades on a log axis); one value: ± half a decade
  (log) or ± half its size (linear, ± 1 for 0)."""
  f, inv = (np.log10, lambda v: 10.0 ** v) if log_x else (float, float)
  lo, hi = f(xs.min()), f(xs.max())
  pad = 0.06 * (hi - lo) if hi > lo else (0.5 if log_x else (abs(lo) * 0.5 or 1.0))
  return inv(lo - pad), inv(hi + pad)


def _spaced(candidates: _Ticks, axes: _Axes, font) -> _Ticks:
  """The candidates (in priority order) whose labels overlap no earlier kept one and stay inside
  the figure, sorted by x."""
  kept: _Ticks = []
  spans: list[tuple[float, float]] = []
  for x, label in candidates:
    half = _text_size(font, label)[0] / 2 + 4
    a, b = axes.px(x) - half, axes.px(x) + half
    if a >= 0 and b <= PLOT_WIDTH and not any(a < s1 and s0 < b for s0, s1 in spans):
      kept.append((x, label))
      spans.append((a, b))
  return sorted(kept)


def _sweep_x_ticks(axes: _Axes, font, xs: np.ndarray) -> tuple[_Ticks, list[float]]:
  """Log axis: labels at the powers of ten in range (every k-th when they would overlap; 1e5
  from 10^5 up and 1e-5 down), and at the data's x values when there are fewer than 3 such
  powers; minor ticks at 2-9 x 10^e. Linear: multiples of 1, 2 or 5 x 10^e."""
  values = sorted(set(xs.tolist()))
  if not axes.log_x:
    step, decimals = _step(axes.x_hi - axes.x_lo, max(1, min(10, axes.width // 70)))
    return _spaced(_multiples(axes.x_lo, axes.x_hi, step, decimals), axes, font), []
  lo, hi = math.log10(axes.x_lo), math.log10(axes.x_hi)
  exps = range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)
  for k in (1, 2, 3, 4, 5, 10, 20, 50, 100):  # every k-th power (multiples of k) when crowded
    candidates = [(10.0 ** e, f"{10.0 ** e:g}" if -4 <= e <= 4 else f"1e{e}")
                  for e in exps if e % k == 0]
    if len(_spaced(candidates, axes, font)) == len(candidates):
      break
  if len(exps) < 3:
    candidates += [(x, f"{x:g}") for x in values]
  labelled = _spaced(candidates, axes, font)
  minor = [m * 10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1) for m in range(2, 10)
           if lo <= math.log10(m * 10.0 ** e) <= hi]
  return labelled, [x for x in minor if all(abs(axes.px(x) - axes.px(t)) > 2 for t, _ in labelled)]


def _draw_sweep_data(canvas: Image.Image, axes: _Axes, series: list[_Series]) -> None:
  """Per series: error bars (clipped to the y range, no cap where clipped), then the line
  (broken at NaN) and markers, on the 2x canvas. Several series are shifted sideways by a few
  px (6 apart, 16 at most in all) so that error bars at the same x stay apart."""
  draw = ImageDraw.Draw(canvas)
  n = len(series)
  for i, (_, xs, ys, errs) in enumerate(series):
    colour = TAB10[i % len(TAB10)]
    shift = (i - (n - 1) / 2) * min(6.0, 16 / (n - 1)) if n > 1 else 0.0
    for x, y, e in zip(xs, ys, errs):
      if math.isfinite(y) and math.isfinite(e) and e > 0:
        top, bottom = min(y + e, axes.y_hi), max(y - e, axes.y_lo)
        _draw_error_bar(draw, axes.px(x) + shift, axes.py(top), axes.py(bottom), colour,
                        caps=(top == y + e, bottom == y - e))
    for run in _finite_runs(xs, ys):
      _draw_series(draw, [(axes.px(a) + shift, axes.py(b)) for a, b in run], colour, radius=3.2)


def _sweep_legend(series: list[_Series]) -> tuple[_Entry, ...]:
  """Rows of the labelled series (labels cut to 240 px), as many as fit beside the plot."""
  font = _font(12)
  rows = []
  for i, (label, *_) in enumerate(series):
    if label is not None:
      text = _printable(label, font)
      if _text_size(font, text)[0] > 240:
        text = text[:_fitting_prefix(text, font, 228)] + "..."
      rows.append((text, TAB10[i % len(TAB10)], "errorbar"))
  fit = (PLOT_HEIGHT - 16) // (_line_height(font) + 4)
  if len(rows) > fit:
    rows = rows[:fit - 1] + [(f"({len(rows) - fit + 1} more not listed)", None, "line")]
  return tuple(rows)


def average_accuracy_sweep(lines, x_label: str, log_x: bool, path: Path, title: str) -> None:
  """Average accuracy (percent) against a swept hyperparameter, as a PNG.

  ``lines``: (label or None, xs, ys, errs) series, each drawn (sorted by x) as a line with
  markers and vertical error bars ±errs (percent, e.g. std over seeds; NaN: no bar); a NaN in
  ys leaves a gap; ys outside 0-100, negative errs or non-finite xs: ValueError. Several series
  are shifted sideways by a few px so that their error bars do not hide each other. Series
  with a label are listed in a legend right of the plot. ``log_x``: a log x axis,
  labelled at the powers of ten (and at the x values when the range holds fewer than three);
  it needs every x > 0, else ValueError (no silent fall-back to a linear axis). The y axis is
  tightened to the data and error bars (see ``_accuracy_ticks``): sweeps typically differ by
  tenths of a point near 97-99 %, which a 0-100 axis would flatten.
  """
  series = _sweep_series(lines, log_x)
  xs = np.concatenate([s[1] for s in series])
  chart = _Chart(title=title, x_label=x_label,
                 y_label=("average accuracy after the last task (%)", "mean ± std over seeds"),
                 x_range=_x_range(xs, log_x),
                 y_ticks=_accuracy_ticks(series), legend=_sweep_legend(series), log_x=log_x,
                 x_grid=True)
  img = _line_plot(chart, lambda axes, font: _sweep_x_ticks(axes, font, xs),
                   lambda canvas, axes: _draw_sweep_data(canvas, axes, series))
  _save_png(img, path)
