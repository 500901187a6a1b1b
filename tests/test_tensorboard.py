"""--tensorboard: scalars per epoch and per task, written while the run trains."""

import glob
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from ewc_jax import continual
from experiments import tensorboard

ROOT = Path(__file__).resolve().parents[1]


def read_scalars(folder) -> dict:
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  tags = {}
  for path in glob.glob(f"{folder}/events*"):
    data, i = Path(path).read_bytes(), 0
    while i < len(data):
      n = struct.unpack("Q", data[i:i + 8])[0]
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        tags.setdefault(v.tag, []).append((event.step, v.simple_value))
  return tags


def test_cli_writes_train_and_test_scalars(tiny_mnist_dir, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.split_mnist", "--num_tasks=3", "--max_examples=200",
       "--epochs=2", "--noprogress", "--noplots", "--nocheckpoint", "--tensorboard",
       "--validation_fraction=0.2", f"--data_dir={tiny_mnist_dir}", f"--workdir={tmp_path}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  tags = read_scalars(tmp_path / "tensorboard" / "seed_0")
  res = json.loads((tmp_path / "results.json").read_text())
  assert [s for s, _ in tags["train/loss_reg"]] == [1, 2, 3, 4, 5, 6]  # 3 tasks x 2 epochs
  np.testing.assert_allclose([v for _, v in tags["train/loss"]],
                             [x for c in res["curves"] for x in c["loss"]], rtol=1e-6)
  assert [s for s, _ in tags["test/task_1"]] == [1, 2, 3]
  assert [s for s, _ in tags["test/task_3"]] == [3]
  np.testing.assert_allclose([v for _, v in tags["test/task_2"]],
                             [row[1] for row in res["acc_matrix"][1:]], rtol=1e-6)
  np.testing.assert_allclose(tags["test/average_accuracy"][-1][1], res["average_accuracy"],
                             rtol=1e-6)
  assert len(tags["validation/average_accuracy"]) == 3


def test_a_resumed_run_writes_only_what_its_checkpoint_had_not_reached(tmp_path):
  curves = [{k: [0.5, 0.4] for k in tensorboard.METRICS}, {k: [0.3] for k in tensorboard.METRICS}]
  acc = np.eye(2) * 0.9
  start = continual.RunState(task=1, epoch=1, step=0, train_state=None, memory=None, acc=acc,
                             curves=curves, epoch_sums={})
  logger = tensorboard.ScalarLogger(tmp_path, start=start)
  later = start._replace(task=2, epoch=0, curves=[curves[0], {k: [0.3, 0.2] for k in curves[1]}])
  logger(later, "task")
  logger.close()
  tags = read_scalars(tmp_path)
  assert tags["train/loss"] == [(4, np.float32(0.2))]          # only the 4th epoch is new
  assert [s for s, _ in tags["test/average_accuracy"]] == [2]  # only task 2's row is new
