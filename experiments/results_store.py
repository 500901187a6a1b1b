"""The JSON store of the reproduction's results: one record per row, merged, written atomically.

The store is ``{"records": {key: record}, "environment": {...}, "updated": "<UTC time>"}``, a
record's key being ``protocol/benchmark/variant/scenario/algorithm`` (:func:`record_key`). The
variant is ``"full"`` (the paper's protocol) or ``"reduced[...]"`` naming the departures from it
(:func:`variant_name`), so a reduced run never overwrites, nor mixes with, the full one. Each
write re-reads the file first (:func:`add_record`), so concurrent invocations only race for the
milliseconds between that read and the atomic rename.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Sequence

from experiments import files

# A record of the runner before it followed the papers' protocol controls (no reset_optimizer
# in the record): it restarted Adam at every task, penalised the backbone only and converted
# iterations to epochs. Such records are kept as their own (reduced) variant.
EARLIER_RUNNER = ("earlier runner: Adam restarted at every task, heads not penalised, "
                  "iterations converted to epochs")


def variant_name(deviations: Sequence[str]) -> str:
  """``"full"`` without departures from the protocol, else ``"reduced[...]"`` naming them."""
  return f"reduced[{'; '.join(deviations)}]" if deviations else "full"


def record_key(protocol: str, benchmark: str, variant: str, scenario: str, algo: str) -> str:
  """The key of a record in the store (each variant of a row stored apart)."""
  return f"{protocol}/{benchmark}/{variant}/{scenario}/{algo}"


def load_store(path: Path) -> dict:
  """The store at ``path`` (an empty one if there is no file), records of earlier formats
  brought up to date: a record without the protocol controls becomes a reduced variant of its
  own (:data:`EARLIER_RUNNER`), one without a variant name gets it from its deviations."""
  if not path.exists():
    return {"records": {}}
  store = json.loads(path.read_text())
  records = {}
  for rec in store["records"].values():
    if "reset_optimizer" not in rec:  # the runner before the papers' protocol controls
      rec.update(reset_optimizer=True, consolidated="backbone", steps_per_task=None)
      rec["deviations"] = list(rec["deviations"]) + [EARLIER_RUNNER]
      rec["reduced"] = True
      rec["variant"] = variant_name(rec["deviations"])
    if "variant" not in rec:  # records written before variants were named
      rec["variant"] = variant_name(rec["deviations"] if rec["reduced"] else [])
    records[record_key(rec["protocol"], rec["benchmark"], rec["variant"], rec["scenario"],
                       rec["algo"])] = rec
  store["records"] = records
  return store


def add_record(path: Path, key: str, record: dict, environment: dict) -> dict:
  """The store at ``path`` re-read, with ``record`` under ``key`` (replacing an older one) and
  ``environment`` as the machine of the latest run; nothing is written (see :func:`save`)."""
  store = load_store(path)
  store["environment"] = environment
  store["records"][key] = record
  return store


def save(store: dict, path: Path) -> None:
  """Stamps ``store["updated"]`` (UTC, seconds) and writes the store to ``path`` atomically."""
  store["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  files.write_json(path, store)
