"""Shared protocol pieces for the PyTorch peer scripts (stdlib + numpy only).

The protocol (identical in every peer script and in our JAX run):

* Split MNIST, task-incremental: 5 tasks with classes {0,1},{2,3},{4,5},{6,7},{8,9};
  labels mapped to 0/1 inside a task (label - 2*t); one 2-way head per task.
* Inputs: raw IDX gzip files from ``--data_dir``, else ``../shared/data/mnist`` beside the
  checkout when it exists, else ``$MNIST_DIR`` (:func:`default_data_dir`), parsed with numpy +
  gzip, pixels/255, flattened to 784 float32.
* Backbone (``--backbone``): ``mlp`` (default) 784-400-400 (two Linear+ReLU layers), or
  ``cnn``, the CNN of flax/examples/mnist without its classifier (our ``--backbone=cnn``): the
  784 inputs viewed as [B, 1, 28, 28], Conv2d(1, 32, 3, padding=1) + ReLU + AvgPool2d(2),
  Conv2d(32, 64, 3, padding=1) + ReLU + AvgPool2d(2), flatten (64*7*7 = 3136), Linear(3136, 256)
  + ReLU. Then a Linear(features, 2) head per task (features = 400 or 256).
* Adam(lr=1e-3), created fresh for every task; batch 128, last partial batch kept,
  reshuffled every epoch; 2 epochs per task by default.
* After each task: diagonal Fisher on that task's train data, then test accuracy on
  every task seen so far (one row of the accuracy matrix).
* Reported: average accuracy (AA) over the 5 tasks after the last task, the
  accuracy matrix, and phase timings (imports, data, train, fisher, eval) in seconds.

This module deliberately imports no torch, so the scripts can time their own imports.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from contextlib import contextmanager

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
NUM_TASKS = 5
BATCH_SIZE = 128
EVAL_BATCH_SIZE = 1000  # evaluation batch size: affects speed only, not accuracy
LR = 1e-3
INPUT_DIM = 784
HIDDEN = 400
CLASSES_PER_TASK = 2
IMAGE_SHAPE = (1, 28, 28)  # the cnn backbone's view of an input: [B, C, H, W]
CNN_CHANNELS = (32, 64)
CNN_FLAT = CNN_CHANNELS[-1] * 7 * 7  # after two 2x2 average pools: 28 -> 14 -> 7
CNN_DENSE = 256
BACKBONES = ("mlp", "cnn")
FEATURES = {"mlp": HIDDEN, "cnn": CNN_DENSE}  # backbone output width = head input width


def parse_args(description: str, default_lam: float) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--lam",
        type=float,
        default=default_lam,
        help="EWC strength lambda in the common convention: loss + (lam/2) * "
        "sum_tasks sum_i F_i (theta_i - theta*_i)^2. Each script converts it "
        "to its library's own parameter (see the script's docstring).",
    )
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--data_dir", default=None,
                   help="folder of the four MNIST IDX files (default: ../shared/data/mnist "
                        "beside the checkout, else $MNIST_DIR)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--backbone", choices=BACKBONES, default="mlp",
                   help="mlp: 784-400-400 ReLU (default); cnn: the CNN of flax/examples/mnist "
                        "without its classifier (two 3x3 convs 32/64 with 2x2 average "
                        "pooling, Linear(3136, 256) + ReLU)")
    args = p.parse_args()
    try:
        args.data_dir = args.data_dir or default_data_dir()
    except FileNotFoundError as err:
        p.error(str(err))
    return args


def default_data_dir() -> str:
    """``../shared/data/mnist`` beside the checkout when it holds the files, else
    ``$MNIST_DIR``; a clear error when neither does."""
    candidates = [os.path.join(os.path.dirname(REPO), "shared", "data", "mnist")]
    if os.environ.get("MNIST_DIR"):
        candidates.append(os.environ["MNIST_DIR"])
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, f)) for f in MNIST_FILES):
            return folder
    raise FileNotFoundError(
        "no MNIST IDX files found: expected " + ", ".join(MNIST_FILES) + " in "
        + " or ".join(candidates) + " (set $MNIST_DIR or pass --data_dir)")


def setup_torch(torch, args) -> None:
    """Thread count and seed, identical in every peer script."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def cnn_backbone(nn):
    """The ``cnn`` backbone as an ``nn.Sequential`` taking flat [B, 784] inputs (``nn`` is
    ``torch.nn``, passed in so this module imports no torch). PyTorch's default
    initialisation (kaiming-uniform weights, uniform biases), not Flax's (LeCun-normal
    kernels, zero biases). Flattening is channel-major (NCHW) where Flax's is NHWC: a fixed
    permutation of the Linear layer's inputs, the same function class."""
    c1, c2 = CNN_CHANNELS
    return nn.Sequential(
        nn.Unflatten(1, IMAGE_SHAPE),
        nn.Conv2d(IMAGE_SHAPE[0], c1, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(CNN_FLAT, CNN_DENSE), nn.ReLU(),
    )


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    # IDX header: 2 zero bytes, dtype code, ndim, then ndim big-endian uint32 dims.
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(tuple(dims))


def load_mnist(data_dir: str):
    """Returns (x_train, y_train, x_test, y_test): float32 [N,784] in [0,1], int64 [N]."""
    out = []
    for split in ("train", "t10k"):
        x = _read_idx(os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz"))
        y = _read_idx(os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz"))
        out.append(x.reshape(len(x), -1).astype(np.float32) / 255.0)
        out.append(y.astype(np.int64))
    return tuple(out)


def split_tasks(x: np.ndarray, y: np.ndarray):
    """[(x_t, y_t)] for the 5 tasks, y_t in {0, 1} (label - 2t), original order kept."""
    tasks = []
    for t in range(NUM_TASKS):
        lo = CLASSES_PER_TASK * t
        m = (y >= lo) & (y < lo + CLASSES_PER_TASK)
        tasks.append((np.ascontiguousarray(x[m]), (y[m] - lo).astype(np.int64)))
    return tasks


def load_split_mnist(data_dir: str):
    """(train_tasks, test_tasks), each a list of 5 (x, y) numpy pairs."""
    xtr, ytr, xte, yte = load_mnist(data_dir)
    return split_tasks(xtr, ytr), split_tasks(xte, yte)


class Timer:
    """Accumulates wall time per phase: with timer("train"): ..."""

    def __init__(self):
        self.t: dict[str, float] = {
            "imports": 0.0, "data": 0.0, "train": 0.0, "fisher": 0.0, "eval": 0.0
        }

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[phase] = self.t.get(phase, 0.0) + time.perf_counter() - t0

    def add(self, phase: str, seconds: float) -> None:
        self.t[phase] = self.t.get(phase, 0.0) + seconds


def average_accuracy(acc_matrix) -> float:
    return float(np.mean(acc_matrix[-1]))


def emit(peer: str, acc_matrix, timer: Timer, **extra) -> None:
    """Print the one JSON result line (the last line on stdout)."""
    rec = {
        "peer": peer,
        "average_accuracy": average_accuracy(acc_matrix),
        "acc_matrix": [[round(float(a), 6) for a in row] for row in acc_matrix],
        "timings": {k: round(v, 4) for k, v in timer.t.items()},
    }
    rec.update(extra)
    print(json.dumps(rec), flush=True)
