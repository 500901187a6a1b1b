"""The accuracy matrix as text: the printed table and the CSV file."""

from __future__ import annotations

import csv
import io
import sys


def format_matrix(acc_matrix, std=None) -> str:
  """The accuracy matrix as a text table (rows: after training task i; columns: task j).

      >>> print(format_matrix([[1.0, 0.5], [0.9, 0.8]]))
      after \\ on       T1      T2    mean
      -----------------------------------
      T1           100.00   50.00  100.00
      T2            90.00   80.00   85.00
  """
  t = len(acc_matrix)
  width = 14 if std is not None else 8
  head = "after \\ on " + "".join(f"{'T' + str(j + 1):>{width}}" for j in range(t)) + f"{'mean':>8}"
  lines = [head, "-" * len(head)]
  for i, row in enumerate(acc_matrix):
    seen = row[:i + 1]
    cells = (f"{100 * v:8.2f}" if std is None else f"{100 * v:8.2f}±{100 * std[i][j]:<5.2f}"
             for j, v in enumerate(row))
    lines.append(f"{'T' + str(i + 1):<11}" + "".join(cells) + f"{100 * sum(seen) / len(seen):8.2f}")
  return "\n".join(lines)


def matrix_csv(acc_matrix) -> str:
  """``after_task,task_1,...`` rows, accuracies with 6 decimals."""
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(["after_task"] + [f"task_{j + 1}" for j in range(len(acc_matrix))])
  for i, row in enumerate(acc_matrix):
    writer.writerow([i + 1] + [f"{v:.6f}" for v in row])
  return out.getvalue()


def warning(line: str) -> None:
  """One ``warning:`` line on stderr (a checkpoint skipped for an older one, ...)."""
  print(f"warning: {' '.join(line.split())}", file=sys.stderr, flush=True)
