"""Small runs shared by several test files: tiny image tasks and counting XLA compilations."""

import jax
import numpy as np

from ewc_jax import continual
from ewc_jax.task_data import pad_tasks

T = 3
IMAGE = (8, 8, 3)


def image_tasks(n, seed, shape=IMAGE):
  """T binary tasks of ``shape`` uint8 images, each labelled by its own random projection
  (sizes n, n - 4, n - 8: one program must serve all)."""
  rng = np.random.default_rng(seed)
  directions = np.random.default_rng(0).normal(size=(T, int(np.prod(shape))))
  xs, ys = [], []
  for t in range(T):
    x = rng.integers(0, 256, (n - 4 * t,) + shape).astype(np.uint8)
    xs.append(x)
    ys.append(((x.reshape(len(x), -1) / 255 - 0.5) @ directions[t] > 0).astype(np.int32))
  return pad_tasks(xs, ys)


class _Bar:
  def update(self, n): pass
  def set_postfix(self, d): pass
  def close(self): pass


def run_counting_compiles(cfg, net, train, test, **kw):
  """``continual.run(cfg, net, train, test, **kw)`` with the XLA compilations counted:
  ``(result, compiles before task 1 trains, compile events from the start of task 2 on)``."""
  events, seen = [], {}
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **_: events.append(name) if "backend_compile" in name else None)

  def progress(task, total, done=0):
    seen[task] = len(events)
    return _Bar()

  result = continual.run(cfg, net, train, test, progress=progress, **kw)
  return result, seen[0], events[seen[1]:]
