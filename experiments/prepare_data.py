r"""Checks whether a TFDS dataset is prepared, and prepares it when it is not.

    python -m experiments.prepare_data --check            # exit 0 if prepared, 1 if not
    python -m experiments.prepare_data                    # TFDS's normal download-and-prepare
    python -m experiments.prepare_data --manual_dir=../shared/data/mnist   # offline, raw files

Preparing needs TensorFlow (``pip install -e .[prepare]``, which ``make prepare-data`` does);
reading a prepared dataset never does.
"""

import sys

from absl import app
from absl import flags

flags.DEFINE_string("dataset", "mnist", "TFDS dataset name.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default as in the experiments).")
flags.DEFINE_string("manual_dir", None, "Folder with the raw files (offline preparation).")
flags.DEFINE_bool("check", False, "Only report whether the dataset is prepared (exit 0/1).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from experiments import data  # pylint: disable=import-outside-toplevel
  data_dir = FLAGS.data_dir or data.default_data_dir()
  try:
    builder = tfds.builder(FLAGS.dataset, data_dir=data_dir)
  except Exception as err:  # pylint: disable=broad-except
    print(f"error: --dataset={FLAGS.dataset!r} is not a TFDS dataset ({err})", file=sys.stderr)
    sys.exit(2)
  if builder.is_prepared():
    print(f"{FLAGS.dataset} is prepared in {builder.data_dir}")
    return
  if FLAGS.check:
    print(f"{FLAGS.dataset} is not prepared (looked in {builder.data_dir})")
    sys.exit(1)
  try:
    data.load_dataset(FLAGS.dataset, data_dir=data_dir, manual_dir=FLAGS.manual_dir)
  except data.DataError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
  print(f"prepared {FLAGS.dataset} in {builder.data_dir}")


if __name__ == "__main__":
  app.run(main)
