"""PNG plots of a run, drawn with Pillow: the accuracy-matrix heatmap and accuracy over training.

Pillow rather than matplotlib: importing matplotlib and rendering two figures took ~0.7 s of a
~7 s command-line run; these take a few hundredths of a second. Lines and markers are drawn at
twice the size and downsampled (anti-aliasing), text is drawn at the final size. Both PNGs are
written atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import types
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# matplotlib's viridis at 0, 1/8, ..., 1; linear interpolation in between.
VIRIDIS = ((68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140),
           (40, 174, 128), (94, 201, 98), (173, 220, 48), (253, 231, 37))
# matplotlib's tab10, cycled for the per-task lines.
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


def _save_png_atomic(img: Image.Image, path: Path) -> None:
  """Writes ``img`` to a temporary file in the same folder, then renames it over ``path``."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      img.save(f, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


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
  _save_png_atomic(_heatmap_image(pct, title), path)


# --- accuracy over training --------------------------------------------------------------------

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
  pad: int = 6  # px between the y range and the frame, so points at 0 or 100 stay inside

  def px(self, x: float) -> float:
    return self.left + (x - self.x_lo) / (self.x_hi - self.x_lo) * self.width

  def py(self, y: float) -> float:
    span = self.height - 2 * self.pad
    return self.top + self.pad + (self.y_hi - y) / (self.y_hi - self.y_lo) * span


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


def _draw_series(draw: ImageDraw.ImageDraw, points, colour, radius: float,
                 k: int = SCALE) -> None:
  """A solid line with round markers of ``radius`` px, on the supersampled canvas."""
  pts = _scaled(points, k)
  if len(pts) > 1:
    draw.line(pts, fill=colour, width=2 * k, joint="curve")
  r = radius * k
  for x, y in pts if r > 0 else ():
    draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)


def _legend_entries(t: int) -> list[tuple[str, tuple | None, bool]]:
  """(label, colour or None for a note, dashed) rows: tasks (at most 10 listed), then the mean."""
  rows = [(f"task {j + 1}", TAB10[j % len(TAB10)], False) for j in range(min(t, LEGEND_TASKS))]
  if t > LEGEND_TASKS:
    rows.append((f"(tasks {LEGEND_TASKS + 1}-{t} not listed)", None, False))
  return rows + [("mean of seen tasks", BLACK, True)]


def _seen_mean(pct: np.ndarray) -> np.ndarray:
  """Mean accuracy over the tasks seen so far, after each training task: mean of R[i, :i+1]."""
  return np.array([np.mean(pct[i, :i + 1]) for i in range(pct.shape[0])])


def _over_training_layout(t: int, title: str, legend_font):
  """Figure size, title and the plot area of the accuracy-over-training figure."""
  width, plot_height = 880, 380
  tick_font, label_font = _font(12), _font(14)
  title_font, title_lines = _fit_title(title, width - 24, 16)
  top = 12 + _title_height(title_font, title_lines) + 12
  legend_w = 24 + 34 + max(_text_size(legend_font, r[0])[0] for r in _legend_entries(t)) + 16
  left = 12 + _line_height(label_font) + 8 + _text_size(tick_font, "100")[0] + 8
  pad_x = max(0.35, 0.025 * t)
  axes = _Axes(left=left, top=top, width=width - left - legend_w, height=plot_height,
               x_lo=1 - pad_x, x_hi=t + pad_x)
  height = top + plot_height + 8 + _line_height(tick_font) + 8 + _line_height(label_font) + 10
  return (width, height), (title_font, title_lines), axes, tick_font, label_font


def _draw_data(canvas: Image.Image, axes: _Axes, pct: np.ndarray, std: np.ndarray | None) -> None:
  """Gridlines, ± std bands, one line per task and the dashed mean, on the 2x canvas."""
  t = pct.shape[0]
  k = SCALE
  draw = ImageDraw.Draw(canvas)
  for v in range(0, 101, 20):
    y = round(axes.py(v)) * k
    draw.line((axes.left * k, y, (axes.left + axes.width) * k, y), fill=GRID, width=k)
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
    pts = _scaled([(axes.px(a), axes.py(b)) for a, b in run], k)
    _dashed(draw, pts, BLACK, 3 * k, dash=9 * k, gap=5 * k)
  draw.rectangle((axes.left * k, axes.top * k, (axes.left + axes.width + 1) * k - 1,
                  (axes.top + axes.height + 1) * k - 1), outline=BLACK, width=k)


def _draw_legend_swatches(canvas: Image.Image, x0: int, y0: int, row_h: int, t: int) -> None:
  """The legend's frame and line samples (with markers) on the 2x canvas."""
  k = SCALE
  draw = ImageDraw.Draw(canvas)
  for r, (_, colour, dashed) in enumerate(_legend_entries(t)):
    y = y0 + 8 + (r + 0.5) * row_h
    if colour is None:
      continue
    if dashed:
      _dashed(draw, _scaled([(x0 + 8, y), (x0 + 38, y)]), colour, 3 * k, dash=9 * k, gap=5 * k)
    else:
      _draw_series(draw, [(x0 + 8, y), (x0 + 38, y)], colour, radius=0)
      _draw_series(draw, [(x0 + 23, y)], colour, radius=3.2)


def _over_training_image(pct: np.ndarray, std: np.ndarray | None, title: str) -> Image.Image:
  """The whole accuracy-over-training figure (values in percent)."""
  t = pct.shape[0]
  legend_font = _font(12)
  (width, height), (title_font, title_lines), axes, tick_font, label_font = \
      _over_training_layout(t, title, legend_font)
  canvas = Image.new("RGB", (width * SCALE, height * SCALE), WHITE)
  _draw_data(canvas, axes, pct, std)
  row_h = _line_height(legend_font) + 4
  legend_x, legend_y = axes.left + axes.width + 14, axes.top
  _draw_legend_swatches(canvas, legend_x, legend_y, row_h, t)
  img = canvas.reduce(SCALE)  # box-filter downsampling: the anti-aliasing
  draw = ImageDraw.Draw(img)
  entries = _legend_entries(t)
  legend_w = width - legend_x - 8
  draw.rectangle((legend_x, legend_y, legend_x + legend_w, legend_y + 16 + len(entries) * row_h),
                 outline=(190, 190, 190))
  for r, (label, colour, _) in enumerate(entries):
    y = legend_y + 8 + (r + 0.5) * row_h
    draw.text((legend_x + (46 if colour else 10), y), label, font=legend_font,
              fill=BLACK if colour else GREY, anchor="lm")
  _draw_lines(draw, title_lines, title_font, width / 2, 12)
  bottom = axes.top + axes.height
  step = _tick_step(axes.width / max(axes.x_hi - axes.x_lo, 1), _text_size(tick_font, str(t))[0])
  for k in _tick_values(t, step):
    x = axes.px(k)
    draw.line((x, bottom, x, bottom + 4), fill=BLACK)
    draw.text((x, bottom + 6), str(k), font=tick_font, fill=BLACK, anchor="mt")
  for v in range(0, 101, 20):
    y = axes.py(v)
    draw.line((axes.left - 5, y, axes.left - 1, y), fill=BLACK)
    draw.text((axes.left - 7, y), str(v), font=tick_font, fill=BLACK, anchor="rm")
  draw.text((axes.left + axes.width / 2, bottom + 8 + _line_height(tick_font) + 8),
            "after training task", font=label_font, fill=BLACK, anchor="mt")
  _vertical_text(img, "test accuracy (%)", label_font,
                 (12 + _line_height(label_font) / 2, axes.top + axes.height / 2))
  return img


def accuracy_over_training(acc: np.ndarray, std: np.ndarray | None, path: Path,
                           title: str) -> None:
  """One line per task j: its test accuracy after each training task i >= j (± std), as a PNG."""
  acc = _square(acc, "acc")
  std = _same_shape(std, acc.shape, "std")
  _save_png_atomic(_over_training_image(100 * acc, None if std is None else 100 * std, title),
                   path)
