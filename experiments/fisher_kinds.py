r"""The Fisher-kind table of van de Ven 2025 on Split MNIST Task-IL, from our sweeps' results.json.

van de Ven, "On the computation of the Fisher Information in continual learning" (ICLR 2025
blog post, arXiv:2502.11756; code: GMvandeVen/continual-learning, ``ICLRblogpost/compare_FI.py``)
compares five ways of computing EWC's diagonal Fisher on Split MNIST Task-IL. Each kind is one
``experiments.sweep`` of λ on the validation split (the best λ by validation average accuracy),
then one sweep of the seeds at that λ on the test split; this module reads those results.json
files and writes the table (JSON and markdown):

    python -m experiments.fisher_kinds --runs=/tmp/sci --out=docs/fisher_kinds.json

``--runs`` holds ``select_<kind>/`` (and ``extend_<kind>_*/``, grid extensions) and
``final_<kind>_s*/`` folders, ``<kind>`` one of :data:`KINDS` (``finetune``: no λ), and
optionally ``shuffled_<kind>/``: the chosen λ again with ``--shuffle_classes`` (each seed its
own class pairs, as in the blog's runs), a second table.

Their mean ± SEM uses ``np.sqrt(np.var(x)) / np.sqrt(n)`` (ddof 0, ``compare_FI.py``); ours is
given both ways. ``z`` is (ours − theirs) / √(SEM_ours² + SEM_theirs²).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
from pathlib import Path

# kind -> (our flags beyond the shared protocol, the blog's name, the blog's mean ± SEM (%), 30 seeds)
KINDS = {
    "true": ("--fisher=true", "EXACT", (99.12, 0.16)),
    "true500": ("--fisher=true --fisher_examples=500", "EXACT (n=500)", (98.93, 0.15)),
    "sampled": ("--fisher=sampled", "SAMPLE", (99.12, 0.12)),
    "empirical": ("--fisher=empirical", "EMPIRICAL", (99.12, 0.12)),
    "batch_squared": ("--fisher=batch_squared --fisher_batch_size=128", "BATCHED (b=128)",
                      (99.11, 0.16)),
    "finetune": ("--algo=finetune", "none", (85.41, 0.88)),
}
PROTOCOL = ("--benchmark=split_mnist --scenario=task --algo=online_ewc --gamma=1 "
            "--steps_per_task=2000 --batch_size=128 --lr=0.001 --reset_optimizer=false "
            "--init=pytorch --hidden=400,400")


def mean_sem(values: list[float]) -> dict:
  """Mean, SEM with ddof 1 and with ddof 0 (the blog's), in the units of ``values``.

      >>> r = mean_sem([1.0, 2.0, 3.0])
      >>> r["mean"], round(r["sem"], 4), round(r["sem_ddof0"], 4)
      (2.0, 0.5774, 0.4714)
  """
  n = len(values)
  mean = sum(values) / n
  ss = sum((v - mean) ** 2 for v in values)
  return {"n": n, "mean": mean,
          "sem": math.sqrt(ss / (n - 1)) / math.sqrt(n) if n > 1 else None,
          "sem_ddof0": math.sqrt(ss / n) / math.sqrt(n)}


def _load(pattern: str) -> list[dict]:
  return [json.loads(Path(p).read_text()) for p in sorted(glob.glob(pattern))]


def kind_row(runs: Path, kind: str) -> dict | None:
  """One kind's selection (λ grid, validation AA per λ, the chosen λ) and test results."""
  flags, blog_name, (blog_mean, blog_sem) = KINDS[kind]
  finals = _load(str(runs / f"final_{kind}_s*" / "results.json"))
  if not finals:
    return None
  selection = []
  for rec in _load(str(runs / f"select_{kind}" / "results.json")) + _load(
      str(runs / f"extend_{kind}_*" / "results.json")):
    for row in rec["table"]:
      selection.append({"lam": row["lam"], "seeds": row["seeds"],
                        "val_average_accuracy": 100 * row["val_average_accuracy"],
                        "test_average_accuracy": 100 * row["average_accuracy"]})
  selection.sort(key=lambda r: r["lam"])
  return {"kind": kind, "blog_name": blog_name, "flags": flags, "selection": selection,
          **_test_results(kind, finals)}


def shuffled_row(runs: Path, kind: str) -> dict | None:
  """One kind's test results with each seed's own class pairs (``shuffled_<kind>/``:
  ``--shuffle_classes``, as the blog's seeds), at the λ chosen with the fixed pairs."""
  finals = _load(str(runs / f"shuffled_{kind}" / "results.json"))
  if not finals:
    return None
  flags, blog_name = KINDS[kind][:2]
  return {"kind": kind, "blog_name": blog_name, "flags": flags + " --shuffle_classes",
          **_test_results(kind, finals)}


def _test_results(kind: str, finals: list[dict]) -> dict:
  """The test AA per seed of ``finals`` (sweeps' results.json), against the blog's."""
  blog_mean, blog_sem = KINDS[kind][2]
  per_seed, lams, walls = {}, set(), []
  for rec in finals:
    walls.append(rec["timings"].get("total"))
    for cfg in rec["configs"]:
      per_seed[cfg["seed"]] = 100 * cfg["average_accuracy"]
      lams.add(cfg["lam"])
  seeds = sorted(per_seed)
  stats = mean_sem([per_seed[s] for s in seeds])
  sem_both = math.sqrt((stats["sem"] or 0.0) ** 2 + blog_sem ** 2)
  return {
      "chosen_lam": None if kind == "finetune" else sorted(lams)[0],
      "seeds": seeds, "test_average_accuracy": [per_seed[s] for s in seeds], **stats,
      "std": (stats["sem"] or 0.0) * math.sqrt(stats["n"]),
      "blog": {"mean": blog_mean, "sem": blog_sem, "seeds": 30,
               "std": blog_sem * math.sqrt(30)},  # their SEM is ddof 0: std = SEM * sqrt(n)
      "difference": stats["mean"] - blog_mean,
      "z": (stats["mean"] - blog_mean) / sem_both,
      "within_2_blog_sem": abs(stats["mean"] - blog_mean) <= 2 * blog_sem,
      "wall_seconds": walls,
      "environment": finals[0].get("environment"),
  }


def markdown(rows: list[dict]) -> str:
  """The table: ours (mean ± SEM, seeds, λ; the std over seeds) beside the blog's."""
  lines = ["| kind (blog) | ours: flags | λ (validation) | ours AA (%) | blog AA (%) | Δ | z "
           "| std over seeds: ours / blog |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lam = "–" if r["chosen_lam"] is None else f"{r['chosen_lam']:g}"
    lines.append(
        f"| {r['blog_name']} | `{r['flags']}` | {lam} | {r['mean']:.2f} ± {r['sem']:.2f} "
        f"({r['n']}) | {r['blog']['mean']:.2f} ± {r['blog']['sem']:.2f} (30) | "
        f"{r['difference']:+.2f} | {r['z']:+.1f} | {r['std']:.2f} / {r['blog']['std']:.2f} |")
  return "\n".join(lines)


def selection_markdown(rows: list[dict]) -> str:
  """The validation grid of each kind: λ -> validation AA (%), the chosen λ in bold."""
  lines = ["| kind | validation AA (%) by λ (seed 0; the chosen λ in bold) |", "|---|---|"]
  for r in rows:
    if not r["selection"]:
      continue
    cells = [(f"**{s['lam']:.0e}: {s['val_average_accuracy']:.2f}**"
              if s["lam"] == r["chosen_lam"] else
              f"{s['lam']:.0e}: {s['val_average_accuracy']:.2f}") for s in r["selection"]]
    lines.append(f"| {r['blog_name']} | {', '.join(cells)} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", required=True, help="folder of the sweeps' workdirs")
  parser.add_argument("--out", required=True, help="the JSON to write")
  args = parser.parse_args(argv)
  rows = [r for r in (kind_row(Path(args.runs), k) for k in KINDS) if r is not None]
  shuffled = [r for r in (shuffled_row(Path(args.runs), k) for k in KINDS) if r is not None]
  record = {"protocol": PROTOCOL, "reference": "van de Ven 2025, arXiv:2502.11756",
            "rows": rows, "rows_shuffled_classes": shuffled}
  Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
  print(markdown(rows))
  print()
  print(selection_markdown(rows))
  if shuffled:
    print()
    print(markdown(shuffled))


if __name__ == "__main__":
  main()
