"""Finiteness of a train chunk: :class:`NumericalError` stops a run; a sweep records each config
that diverged (:func:`new_divergences`, :func:`divergence_record`) and goes on."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ewc_jax import errors


class NumericalError(ArithmeticError):
  """The training loss became NaN or infinite: the run stops before that state is kept.

  Attributes (0-based): ``task``, ``epoch``, ``step`` (within the epoch), ``task_step`` (within
  the task), ``part`` (``"cls"``, ``"reg"``, ``"cls and reg"``, or ``"sum"`` when only their
  sum overflows), ``value`` (the bad loss value) and ``config`` (sweep index, or None).
  """

  def __init__(self, message: str | Callable[..., str], *, task: int, epoch: int, step: int,
               task_step: int, part: str, value: float, config: int | None = None):
    # message: text, or ``render(name)`` naming settings (see ewc_jax.errors.SettingError)
    self.render = message if callable(message) else (lambda name: message)
    super().__init__(self.render(errors.as_field))
    self.task, self.epoch, self.step, self.task_step = task, epoch, step, task_step
    self.part, self.value, self.config = part, value, config

  def for_flags(self) -> str:
    """The message with the settings spelled as flags (``--lr``)."""
    return self.render(errors.as_flag)


def check_finite(metrics: dict, *, task: int, num_tasks: int, epoch: int, start: int,
                 steps: int) -> None:
  """Raises :class:`NumericalError` at the first step of a chunk whose loss is not finite, or
  at the chunk's end when its parameters or optimizer state are not (``metrics`` of
  :func:`ewc_jax.continual.step.train_chunk`, with a leading config axis in a sweep)."""
  parts = [np.asarray(metrics[k]) for k in ("loss_cls", "loss_reg", "loss")]
  bad = [~np.isfinite(a) for a in parts]
  any_bad = bad[0] | bad[1] | bad[2]
  if not np.any(any_bad):
    _check_state_finite(metrics, task=task, num_tasks=num_tasks, epoch=epoch, start=start,
                        steps=steps)
    return
  config, i = (None, int(np.argmax(any_bad))) if any_bad.ndim == 1 else (
      tuple(int(v) for v in np.argwhere(any_bad.T)[0][::-1]))
  at = (i,) if config is None else (config, i)
  cls_bad, reg_bad = bool(bad[0][at]), bool(bad[1][at])
  part = ("cls and reg" if cls_bad and reg_bad else "cls" if cls_bad else "reg" if reg_bad
          else "sum")
  value = float(parts[0 if cls_bad else 1 if reg_bad else 2][at])
  name = {"cls": "loss_cls", "reg": "loss_reg", "cls and reg": "loss_cls and loss_reg",
          "sum": "loss_cls + loss_reg"}[part]
  step = start + i
  where = f" of sweep config {config}" if config is not None else ""
  text = (f"the training loss became {value} at task {task + 1}/{num_tasks}, epoch {epoch + 1}, "
          f"step {step + 1}/{steps}{where}: {name} {'are' if ' and ' in part else 'is'} not "
          f"finite (the {part} part of the loss). Stopped before keeping that state")
  raise NumericalError(
      lambda n: f"{text}; try a smaller {n('lr')} or {n('lam')}.",
      task=task, epoch=epoch, step=step, task_step=epoch * steps + step, part=part,
      value=value, config=config)


def _check_state_finite(metrics: dict, *, task: int, num_tasks: int, epoch: int, start: int,
                        steps: int) -> None:
  """The state part of :func:`check_finite`: the parameters, then the optimizer state."""
  for key, part in (("params_finite", "parameters"), ("opt_state_finite", "optimizer state")):
    if key not in metrics:
      continue
    bad = ~np.asarray(metrics[key], bool)
    if not np.any(bad):
      continue
    config = None if bad.ndim == 0 else int(np.argmax(bad))
    done = np.asarray(metrics["count"]) > 0
    active = int(done.sum(-1) if config is None else done[config].sum(-1))
    last = start + max(active, 1)
    where = f" of sweep config {config}" if config is not None else ""
    text = (f"the {part} became non-finite at task {task + 1}/{num_tasks}, epoch {epoch + 1}, "
            f"steps {start + 1}-{last}/{steps}{where}, while the training loss stayed finite "
            "(e.g. the optimizer's second moment overflowed). Stopped before keeping that state")
    raise NumericalError(
        lambda n, text=text: f"{text}; try a smaller {n('lr')} or {n('lam')}.",
        task=task, epoch=epoch, step=last - 1, task_step=epoch * steps + last - 1, part=part,
        value=float("nan"), config=config)


def divergence_record(err: NumericalError) -> dict:
  """A sweep config's divergence as plain data (saved in checkpoints, returned in results)."""
  return {"task": err.task, "epoch": err.epoch, "step": err.step, "part": err.part,
          "value": err.value, "message": str(err), "flags_message": err.for_flags()}


def new_divergences(metrics: dict, diverged: dict, *, task: int, num_tasks: int, epoch: int,
                    start: int, steps: int) -> dict[int, NumericalError]:
  """Sweeps: ``{config: NumericalError}`` of the configs of a chunk's ``metrics`` (leading
  config axis) that diverged in it, those already in ``diverged`` left out."""
  out = {}
  for k in range(int(np.asarray(metrics["loss"]).shape[0])):
    if k in diverged:
      continue
    try:
      check_finite({name: np.asarray(v)[k] for name, v in metrics.items()}, task=task,
                   num_tasks=num_tasks, epoch=epoch, start=start, steps=steps)
    except NumericalError as err:
      err.config = k
      out[k] = err
  return out

