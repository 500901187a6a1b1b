"""A sweep's results as a table: one row per swept setting, aggregated over seeds, ranked.

    rows = table(result)                  # result: ewc_jax.continual.sweep.SweepResult
    print(format_table(rows, ["lam"]))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
  from ewc_jax.continual.sweep import SweepResult


def table(result: SweepResult) -> list[dict]:
  """One row per combination of the swept values other than the seed, aggregated over seeds
  (mean and population std), sorted by mean average accuracy, best first.

  With a validation split (``Config.validation_fraction > 0``) the rows also hold
  ``val_average_accuracy`` (and ``_std``) and are ranked by it: hyperparameters are chosen on
  the validation split, never on the test set."""
  keys = [n for n in result.swept if n != "seed"]
  groups: dict[tuple, list[int]] = {}
  for k, cfg in enumerate(result.configs):
    groups.setdefault(tuple(getattr(cfg, n) for n in keys), []).append(k)
  rows = []
  for values, members in groups.items():
    row = dict(zip(keys, values))
    row["seeds"] = [result.configs[k].seed for k in members]
    row["diverged_seeds"] = [result.configs[k].seed for k in members
                             if k in (result.diverged or {})]
    for metric in ("average_accuracy", "bwt", "mean_forgetting"):
      vals = np.array([result.summaries[k][metric] for k in members])
      row[metric] = float(vals.mean())
      row[metric + "_std"] = float(vals.std())
    if result.val_summaries is not None:
      vals = np.array([result.val_summaries[k]["average_accuracy"] for k in members])
      row["val_average_accuracy"] = float(vals.mean())
      row["val_average_accuracy_std"] = float(vals.std())
    rows.append(row)
  rank = "val_average_accuracy" if result.val_summaries is not None else "average_accuracy"
  rows.sort(key=lambda r: (np.isnan(r[rank]), -r[rank] if not np.isnan(r[rank]) else 0.0))
  return rows


def format_table(rows: list[dict], keys: Sequence[str]) -> str:
  """The rows of :func:`table` as text (percent); the validation AA first when there is one."""
  val = bool(rows) and "val_average_accuracy" in rows[0]
  head = ("".join(f"{k:>10}" for k in keys) + (f"{'val AA (%)':>16}" if val else "")
          + f"{'AA (%)':>16}{'BWT (%)':>16}{'forget (%)':>12}{'seeds':>7}")
  lines = [head, "-" * len(head)]
  for r in rows:
    if r.get("diverged_seeds"):
      seeds = ",".join(map(str, r["diverged_seeds"]))
      lines.append("".join(f"{r[k]:>10g}" for k in keys)
                   + f"   diverged (seed {seeds}): no result")
      continue
    lines.append("".join(f"{r[k]:>10g}" for k in keys)
                 + (f"{100 * r['val_average_accuracy']:>9.2f} ± "
                    f"{100 * r['val_average_accuracy_std']:<4.2f}" if val else "")
                 + f"{100 * r['average_accuracy']:>9.2f} ± {100 * r['average_accuracy_std']:<4.2f}"
                 + f"{100 * r['bwt']:>+9.2f} ± {100 * r['bwt_std']:<4.2f}"
                 + f"{100 * r['mean_forgetting']:>12.2f}{len(r['seeds']):>7d}")
  return "\n".join(lines)


__all__ = ["format_table", "table"]
