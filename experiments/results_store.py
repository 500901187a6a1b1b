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
# A Permuted MNIST record of the runner before it used van de Ven & Tolias' own inputs (no
# ``inputs`` in the record): 28x28 images (784 inputs), task 1 the identity, one set of
# permutations, drawn from the row's first seed, shared by all its seeds, and Flax's
# initialisation. Such records are kept as their own (reduced) variant, apart from the rows on
# the paper's inputs.
EARLIER_INPUTS = ("earlier inputs: 784 (not padded to 1024), task 1 unpermuted, the first "
                  "seed's permutations shared by all seeds, Flax's initialisation")
# Their ``inputs``, as the runner records them now (so a migrated record, saved again, stays as
# it is).
EARLIER_PERMUTED_INPUTS = {"num_inputs": 784, "pad": 0, "permute_first": False,
                           "tasks_per_seed": False}


def variant_name(deviations: Sequence[str]) -> str:
  """``"full"`` without departures from the protocol, else ``"reduced[...]"`` naming them."""
  return f"reduced[{'; '.join(deviations)}]" if deviations else "full"


def record_key(protocol: str, benchmark: str, variant: str, scenario: str, algo: str) -> str:
  """The key of a record in the store (each variant of a row stored apart)."""
  return f"{protocol}/{benchmark}/{variant}/{scenario}/{algo}"


def load_store(path: Path) -> dict:
  """The store at ``path`` (an empty one if there is no file), records of earlier formats
  brought up to date: a record without the protocol controls becomes a reduced variant of its
  own (:data:`EARLIER_RUNNER`), one without a variant name gets it from its deviations, a
  Permuted MNIST record without ``inputs`` a variant on the earlier inputs
  (:data:`EARLIER_INPUTS`). The file itself is not rewritten here."""
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
    if rec["benchmark"] == "permuted" and "inputs" not in rec:  # before the paper's inputs
      rec["inputs"] = dict(EARLIER_PERMUTED_INPUTS)
      rec["deviations"] = list(rec["deviations"]) + [EARLIER_INPUTS]
      rec["reduced"] = True
      rec["variant"] = variant_name(rec["deviations"])
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
