"""Numerical faults: a NaN/Inf loss stops the run (task, step, part named; nothing bad kept) and
the Fisher pass stays finite for huge logits. (The command line's status 3 on divergence is in
tests/test_cli.py, with the other one-line errors.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewc_jax import checkpoint, continual, fisher_diagonal, heads
from ewc_jax.continual import step as step_lib

T = 3
CFG = continual.Config(epochs=1, batch_size=16, hidden=(16,), lam=100.0, chunk_steps=4,
                       fisher_batch_size=32)


def float_tasks(n, nan_task=None):
  """T binary tasks of float features; every input of ``nan_task`` is NaN."""
  from ewc_jax.continual.task_data import pad_tasks  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  xs, ys = [], []
  for t in range(T):
    x = rng.normal(size=(n, 8)).astype(np.float32)
    ys.append((x[:, t] > 0).astype(np.int32))
    xs.append(np.full_like(x, np.nan) if t == nan_task else x)
  return pad_tasks(xs, ys)


def run(cfg=CFG, nan_task=None, **kw):
  net = heads.task_incremental(T, 2, hidden=cfg.hidden)
  return continual.run(cfg, net, float_tasks(64, nan_task), float_tasks(32),
                       preprocess=lambda x: x.astype(jnp.float32), **kw)


def test_nan_inputs_stop_the_task_naming_task_step_and_cls_and_keep_the_last_checkpoint(
    tmp_path):
  identity = dataclasses.asdict(CFG)
  calls = []
  with checkpoint.RunCheckpointer(tmp_path / "ck", identity, every=1,
                                  chunk_steps=CFG.chunk_steps) as ckpt:
    def hook(rs, reason):
      calls.append((rs.task, rs.epoch, rs.step, reason))
      ckpt(rs, reason)
    with pytest.raises(continual.NumericalError) as err:
      run(nan_task=1, on_checkpoint=hook)
  e = err.value
  assert (e.task, e.epoch, e.step, e.task_step, e.part) == (1, 0, 0, 0, "cls")
  assert np.isnan(e.value)
  assert "task 2/3, epoch 1, step 1/4" in str(e) and "loss_cls is not finite" in str(e)
  assert calls[-1] == (1, 0, 0, "task")  # nothing of task 2 reached the hook
  meta = checkpoint.RunCheckpointer(tmp_path / "ck", identity).read_meta()
  assert (meta["task"], meta["epoch"], meta["step"]) == (1, 0, 0)  # the last good state


def test_nan_importance_stops_naming_reg():
  """Resumed at task 2 with NaN in the memory (anchors/importance): the reg part is named."""
  net = heads.task_incremental(T, 2, hidden=CFG.hidden)
  params = heads.init_params(net, jax.random.key(0), jnp.zeros((1, 8)))
  memory = continual.make_algorithm(CFG).init(heads.consolidated(net, params), T)
  rs = continual.RunState(
      task=1, epoch=0, step=0,
      train_state=step_lib.init_train_state(step_lib.make_optimizer(), params, CFG.lr),
      memory=jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), memory),
      acc=np.zeros((T, T)), curves=[{k: [0.0] for k in step_lib.METRIC_NAMES}], epoch_sums={})
  with pytest.raises(continual.NumericalError) as err:
    run(resume=rs)
  assert (err.value.task, err.value.step, err.value.part) == (1, 0, "reg")
  assert "loss_reg is not finite" in str(err.value)


def test_check_finite_reports_the_first_bad_step_and_sweep_config():
  ok = np.ones((2, 4), np.float32)
  m = {"loss_cls": ok.copy(), "loss_reg": ok.copy(), "loss": ok.copy()}
  m["loss_reg"][1, 2] = np.inf
  m["loss_cls"][0, 3] = np.nan
  with pytest.raises(continual.NumericalError) as err:
    continual.check_finite(m, task=0, num_tasks=2, epoch=1, start=8, steps=20)
  e = err.value
  assert (e.config, e.step, e.task_step, e.part) == (1, 10, 30, "reg")
  assert "sweep config 1" in str(e)
  continual.check_finite({k: ok for k in m}, task=0, num_tasks=2, epoch=0, start=0, steps=4)


@pytest.mark.parametrize("kind", ["empirical", "true", "sampled", "predicted", "batch_squared"])
def test_fisher_is_finite_for_logits_of_1e4(kind):
  """Stable log-softmax: saturated logits (~1e4, some with the wrong label) give finite F."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(20, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 20), jnp.int32)
  params = {"w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) * 5e3,
            "b": jnp.asarray([1e4, -1e4, 0.0], jnp.float32)}
  logits_fn = lambda p, xb: jnp.tanh(xb) @ p["w"] + p["b"]  # noqa: E731
  assert 5e3 < float(jnp.max(jnp.abs(logits_fn(params, x)))) < 1e5
  imp = fisher_diagonal(logits_fn, params, x, y, kind=kind, batch_size=8,
                        key=jax.random.key(0))
  for leaf in jax.tree.leaves(imp):
    assert np.all(np.isfinite(np.asarray(leaf))) and np.all(np.asarray(leaf) >= 0), kind
  loss, acc = step_lib.masked_cross_entropy(logits_fn(params, x), y, jnp.ones(20))
  assert np.isfinite(float(loss)) and float(loss) > 1e3 and 0 <= float(acc) <= 1


def test_check_finite_names_a_non_finite_optimizer_state_and_sweeps_record_it():
  """The loss finite, the optimizer state not (Adam's second moment overflowed): a single run
  stops naming it; a sweep's chunk check records the config and goes on."""
  ok = np.ones((4,), np.float32)
  m = {"loss_cls": ok, "loss_reg": ok, "loss": ok, "count": ok * 16,
       "params_finite": np.bool_(True), "opt_state_finite": np.bool_(False)}
  with pytest.raises(continual.NumericalError) as err:
    continual.check_finite(m, task=1, num_tasks=3, epoch=0, start=8, steps=20)
  assert err.value.part == "optimizer state" and "steps 9-12/20" in str(err.value)
  assert "--lam" in err.value.for_flags()
  batched = {k: np.stack([v, v, v]) for k, v in m.items()}
  batched["opt_state_finite"] = np.array([True, False, True])
  batched["loss"] = batched["loss"].copy()
  batched["loss"][2, 1] = np.nan
  new = continual.new_divergences(batched, {}, task=1, num_tasks=3, epoch=0, start=8, steps=20)
  assert sorted(new) == [1, 2] and new[1].part == "optimizer state" and new[2].part == "sum"
  assert continual.new_divergences(batched, {1: {}, 2: {}}, task=1, num_tasks=3, epoch=0,
                                   start=8, steps=20) == {}
