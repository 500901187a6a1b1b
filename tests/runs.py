"""Small runs shared by several test files: tiny image tasks and counting XLA compilations."""

import jax
import numpy as np

from ewc_jax import continual
from ewc_jax.continual.task_data import pad_tasks

T = 3
IMAGE = (8, 8, 3)


def image_tasks(n, seed, shape=IMAGE):
  """T binary tasks of ``shape`` uint8 images: noise, plus (label 1) a bright pattern of the
  task's own (sizes n, n - 4, n - 8: one program must serve all)."""
  rng = np.random.default_rng(seed)
  patterns = np.random.default_rng(0).random((T,) + shape) < 0.25
  xs, ys = [], []
  for t in range(T):
    y = rng.integers(0, 2, n - 4 * t).astype(np.int32)
    x = rng.integers(0, 100, (n - 4 * t,) + shape) + 155 * (y[:, None, None, None] * patterns[t])
    xs.append(x.astype(np.uint8))
    ys.append(y)
  return pad_tasks(xs, ys)


class _Bar:
  def update(self, n): pass
  def set_postfix(self, d): pass
  def close(self): pass


def run_counting_compiles(cfg, net, train, test, **kw):
  """``continual.run(cfg, net, train, test, **kw)`` with the XLA compilations counted:
  ``(result, compiles before task 1 trains, compile events from the start of task 2 on)``.

  Tracing is counted with compiling: the test session's persistent compile cache (conftest)
  serves a program compiled before, so a re-traced program shows as a trace, not a compile."""
  events, seen = [], {}
  watched = ("backend_compile", "jaxpr_trace_duration")
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **_: events.append(name) if any(w in name for w in watched) else None)

  def progress(task, total, done=0):
    seen[task] = len(events)
    return _Bar()

  result = continual.run(cfg, net, train, test, progress=progress, **kw)
  return result, seen[0], events[seen[1]:]
