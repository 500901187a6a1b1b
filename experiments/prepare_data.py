r"""Checks whether a TFDS dataset is prepared, and prepares it when it is not.

    python -m experiments.prepare_data --check            # exit 0 if prepared, 1 if not
    python -m experiments.prepare_data                    # TFDS's normal download-and-prepare
    python -m experiments.prepare_data --manual_dir=../shared/data/mnist   # offline, raw files

Preparing needs TensorFlow (``pip install -e .[prepare]``, which ``make prepare-data`` does);
reading a prepared dataset never does.
"""

import sys
from typing import NamedTuple

from absl import app
from absl import flags

from experiments import data

flags.DEFINE_string("dataset", "mnist", "TFDS dataset name.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default as in the experiments).")
flags.DEFINE_string("manual_dir", None, "Folder with the raw files (offline preparation).")
flags.DEFINE_bool("check", False, "Only report whether the dataset is prepared (exit 0/1).")
FLAGS = flags.FLAGS


class Request(NamedTuple):
  """What to check or prepare: a TFDS ``dataset`` in ``data_dir`` (None: the experiments'
  default), from the raw files in ``manual_dir`` (None: TFDS downloads); ``check``: only report."""
  dataset: str = "mnist"
  data_dir: str | None = None
  manual_dir: str | None = None
  check: bool = False


def prepare(request: Request) -> int:
  """Reports whether ``request.dataset`` is prepared, and prepares it when it is not (unless
  ``request.check``); returns the exit status: 0 prepared, 1 not prepared (``check``), 2 a bad
  dataset name or a preparation that failed (one ``error:`` line on stderr)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  name = request.dataset
  data_dir = request.data_dir or data.default_data_dir()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as err:  # pylint: disable=broad-except
    print(f"error: --dataset={name!r} is not a TFDS dataset ({err})", file=sys.stderr)
    return 2
  if builder.is_prepared():
    print(f"{name} is prepared in {builder.data_dir}")
    return 0
  if request.check:
    print(f"{name} is not prepared (looked in {builder.data_dir})")
    return 1
  try:
    data.load_dataset(name, data_dir=data_dir, manual_dir=request.manual_dir)
  except data.DataError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(f"prepared {name} in {builder.data_dir}")
  return 0


def main(argv):
  """The flags -> a :class:`Request` -> :func:`prepare`; its status is the exit status."""
  del argv
  sys.exit(prepare(Request(FLAGS.dataset, FLAGS.data_dir, FLAGS.manual_dir, FLAGS.check)))


if __name__ == "__main__":
  app.run(main)
