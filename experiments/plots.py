"""The PNG plots of a run (accuracy-matrix heatmap, accuracy over training) and of a sweep (average
accuracy against a hyperparameter), drawn with matplotlib (Agg backend).

matplotlib is imported only when a plot is drawn; :func:`prefetch` imports it on a background
thread while the first task trains, so that the default run does not wait for it. The PNGs are
written atomically (:mod:`experiments.files`); bad input raises a ``ValueError`` naming the
argument before anything is written.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np

from experiments import files

LEGEND_TASKS = 10  # accuracy_over_training lists at most this many tasks in its legend
_IMPORT_LOCK = threading.Lock()


def _pyplot():
  """matplotlib's pyplot on the Agg backend (no display needed), imported once."""
  with _IMPORT_LOCK:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def prefetch() -> threading.Thread:
  """Imports matplotlib on a daemon thread (idempotent in effect); a plot later waits for it."""
  thread = threading.Thread(target=_pyplot, name="ewc_jax-matplotlib-import", daemon=True)
  thread.start()
  return thread


# --- input checks ----------------------------------------------------------------------------

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



def _save(fig, path: Path) -> None:
  """Renders ``fig`` to PNG bytes, then writes them atomically; the figure is closed."""
  plt = _pyplot()
  try:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  finally:
    plt.close(fig)
  files.write_atomic(Path(path), lambda f: f.write(buf.getvalue()))


def _task_labels(t: int) -> list[str]:
  return [f"T{i + 1}" for i in range(t)]


# --- a run -----------------------------------------------------------------------------------

def heatmap_figure(acc: np.ndarray, title: str):
  """The figure of :func:`accuracy_heatmap` (not saved)."""
  pct = 100 * _square(acc, "acc")
  t = pct.shape[0]
  plt = _pyplot()
  side = min(1.2 + 0.55 * t, 12.0)
  fig, ax = plt.subplots(figsize=(side + 1.5, side))
  cmap = plt.get_cmap("viridis").with_extremes(bad="#c8c8c8")
  image = ax.imshow(np.ma.masked_invalid(pct), cmap=cmap, vmin=0, vmax=100)
  if t <= 20:  # values in the cells while they are readable
    for i in range(t):
      for j in range(t):
        if np.isfinite(pct[i, j]):
          ax.text(j, i, f"{pct[i, j]:.1f}", ha="center", va="center", fontsize=8,
                  color="black" if pct[i, j] > 60 else "white")
  ticks = np.arange(t) if t <= 20 else np.arange(0, t, max(1, t // 10))
  labels = _task_labels(t)
  ax.set_xticks(ticks, [labels[k] for k in ticks])
  ax.set_yticks(ticks, [labels[k] for k in ticks])
  ax.set_xlabel("tested on task")
  ax.set_ylabel("after training task")
  ax.set_title(title, fontsize=10, wrap=True)
  fig.colorbar(image, ax=ax, label="test accuracy (%)")
  return fig


def accuracy_heatmap(acc: np.ndarray, path: Path, title: str) -> None:
  """R[i, j] (rows: after training task i; columns: tested on task j), in percent, as a PNG."""
  _save(heatmap_figure(acc, title), path)


def over_training_figure(acc: np.ndarray, std: np.ndarray | None, title: str):
  """The figure of :func:`accuracy_over_training` (not saved)."""
  acc = _square(acc, "acc")
  std = _same_shape(std, acc.shape, "std")
  t = acc.shape[0]
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8.8, 4.4))
  after = np.arange(1, t + 1)
  for j in range(t):
    xs, ys = after[j:], 100 * acc[j:, j]
    (line,) = ax.plot(xs, ys, marker="o", markersize=3,
                      label=f"task {j + 1}" if j < LEGEND_TASKS else None)
    if std is not None:
      band = 100 * np.nan_to_num(std[j:, j])
      ax.fill_between(xs, ys - band, ys + band, color=line.get_color(), alpha=0.2, linewidth=0)
  ax.set_xlim(0.7, t + 0.3)
  ax.set_ylim(0, 100)
  ax.set_xticks(after if t <= 20 else after[::max(1, t // 10)])
  ax.set_xlabel("after training task")
  ax.set_ylabel("test accuracy (%)" + (" (mean ± std)" if std is not None else ""))
  ax.grid(alpha=0.3)
  ax.set_title(title, fontsize=10, wrap=True)
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8,
            title=None if t <= LEGEND_TASKS else f"first {LEGEND_TASKS} of {t}")
  return fig


def accuracy_over_training(acc: np.ndarray, std: np.ndarray | None, path: Path,
                           title: str) -> None:
  """One line per task j: its test accuracy after each training task i >= j (± std), as a PNG."""
  _save(over_training_figure(acc, std, title), path)


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



def accuracy_limits(series: list[_Series]) -> tuple[float, float]:
  """y limits (percent) tightened to the data and error bars with an 8 % margin, at least 1
  point wide, within 0-100; 0-100 when nothing is finite (sweeps differ by tenths of a point
  near 97-99 %, which a 0-100 axis would flatten)."""
  ends = [v for _, _, ys, errs in series for y, e in zip(ys, np.nan_to_num(errs))
          if np.isfinite(y) for v in (y - e, y + e)]
  if not ends:
    return 0.0, 100.0
  lo, hi = max(0.0, min(ends)), min(100.0, max(ends))
  margin = 0.08 * (hi - lo)
  lo, hi = lo - margin, hi + margin
  if hi - lo < 1:
    lo, hi = (lo + hi) / 2 - 0.5, (lo + hi) / 2 + 0.5
  return max(0.0, lo), min(100.0, hi)


def sweep_figure(lines, x_label: str, log_x: bool, title: str):
  """The figure of :func:`average_accuracy_sweep` (not saved)."""
  series = _sweep_series(lines, log_x)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8.8, 4.6))
  for label, xs, ys, errs in series:
    ax.errorbar(xs, ys, yerr=np.where(np.isfinite(errs), errs, 0.0), marker="o", markersize=4,
                capsize=3, label=label)
  if log_x:
    ax.set_xscale("log")
  ax.set_ylim(*accuracy_limits(series))
  ax.set_xlabel(x_label)
  ax.set_ylabel("average accuracy after the last task (%)\nmean ± std over seeds")
  ax.grid(alpha=0.3, which="both" if log_x else "major")
  ax.set_title(title, fontsize=10, wrap=True)
  if any(label is not None for label, *_ in series):
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
  return fig


def average_accuracy_sweep(lines, x_label: str, log_x: bool, path: Path, title: str) -> None:
  """Average accuracy (percent) against a swept hyperparameter, as a PNG.

  ``lines``: (label or None, xs, ys, errs) series, each drawn (sorted by x) as a line with
  markers and vertical error bars ±errs (percent, e.g. std over seeds; NaN: no bar); a NaN in
  ys leaves a gap; ys outside 0-100, negative errs or non-finite xs: ValueError. Labelled
  series are listed in a legend right of the plot. ``log_x`` needs every x > 0, else ValueError
  (no silent fall-back to a linear axis). The y axis is tightened (:func:`accuracy_limits`).
  """
  _save(sweep_figure(lines, x_label, log_x, title), path)
