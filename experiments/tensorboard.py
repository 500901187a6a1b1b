"""TensorBoard scalars of a run, written while it trains (``--tensorboard``; tensorboardX, no
TensorFlow).

:class:`ScalarLogger` is an ``on_checkpoint`` hook of :func:`ewc_jax.continual.run`: after every
finished epoch it writes the epoch's mean ``train/loss``, ``train/loss_cls``, ``train/loss_reg``
and ``train/acc`` (step: epochs trained so far, over all tasks), and after every task
``test/task_<j>`` (accuracy on each task seen so far), ``test/average_accuracy`` and, with a
validation split, ``validation/average_accuracy`` (step: tasks trained). A resumed run writes
only what its checkpoint had not reached.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

METRICS = ("loss", "loss_cls", "loss_reg", "acc")


class ScalarLogger:
  """Writes a run's scalars under ``logdir`` (one TensorBoard run)."""

  def __init__(self, logdir: Path, *, start=None):
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._writer = SummaryWriter(str(logdir))
    self._epochs = 0 if start is None else sum(len(c["loss"]) for c in start.curves)
    self._tasks = 0 if start is None else int(start.task)

  def __call__(self, rs, reason: str) -> None:
    epochs = sum(len(c["loss"]) for c in rs.curves)
    flat = [(t, e) for t, c in enumerate(rs.curves) for e in range(len(c["loss"]))]
    for step in range(self._epochs, epochs):
      t, e = flat[step]
      for name in METRICS:
        self._writer.add_scalar(f"train/{name}", float(np.mean(rs.curves[t][name][e])), step + 1)
    self._epochs = epochs
    if reason == "task" and rs.task > self._tasks:
      for i in range(self._tasks, rs.task):
        row = np.asarray(rs.acc)[..., i, :i + 1].reshape(-1, i + 1).mean(0)
        for j, value in enumerate(row):
          self._writer.add_scalar(f"test/task_{j + 1}", float(value), i + 1)
        self._writer.add_scalar("test/average_accuracy", float(row.mean()), i + 1)
        if rs.val_acc is not None:
          val = np.asarray(rs.val_acc)[..., i, :i + 1].mean()
          self._writer.add_scalar("validation/average_accuracy", float(val), i + 1)
      self._tasks = rs.task
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def chain(*hooks):
  """One ``on_checkpoint`` hook calling ``hooks`` (None skipped) in order."""
  hooks = [h for h in hooks if h is not None]

  def call(rs, reason):
    for hook in hooks:
      hook(rs, reason)
  return call
