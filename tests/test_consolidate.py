"""What is consolidated (every parameter several tasks share), iteration counts, optimizer reset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ewc_jax import continual, heads
from ewc_jax.continual import step as step_lib
from ewc_jax.continual import task_data
from tests.test_continual import CFG, T, synthetic_tasks


def _class_tasks(n, seed):
  """T tasks of 2 global classes each (class-incremental labels 2t, 2t+1)."""
  data = synthetic_tasks(n, seed)
  labels = np.asarray(data.labels) + 2 * np.arange(T)[:, None]
  return data._replace(labels=labels.astype(np.int32))


def _network(scenario):
  groups = [(2 * t, 2 * t + 1) for t in range(T)]
  return heads.make_network(scenario, groups, CFG.hidden)


def _run(scenario, **changes):
  cfg = dataclasses.replace(CFG, scenario=scenario, **changes)
  make = _class_tasks if scenario == "class" else synthetic_tasks
  return continual.run(cfg, _network(scenario), make(200, 0), make(100, 100))


def _anchor_params(memory):
  """The anchored parameters (ewc: stacked anchors; online: one anchor; merged: the mean)."""
  memory = getattr(memory, "anchors", memory)
  return memory.params if hasattr(memory, "params") else memory.mean


def _anchor_importance(memory):
  memory = getattr(memory, "anchors", memory)
  return memory.importance if hasattr(memory, "importance") else memory.weight


@pytest.mark.parametrize("scenario,expected", [("task", ()), ("domain", ("shared",)),
                                               ("class", ("shared",))])
def test_shared_heads_are_those_of_several_tasks(scenario, expected):
  net = _network(scenario)
  assert heads.consolidated_heads(net, "shared") == expected
  assert heads.consolidated_heads(net, "backbone") == ()
  assert heads.consolidated_heads(net, "all") == tuple(net.heads)
  with pytest.raises(ValueError, match="consolidate"):
    heads.consolidated_heads(net, "heads")


@pytest.mark.parametrize("scenario,algo", [("domain", "ewc"), ("class", "ewc_merged"),
                                           ("domain", "online_ewc"), ("class", "l2")])
def test_shared_head_is_anchored_with_nonzero_importance(scenario, algo):
  result = _run(scenario, algo=algo)
  imp = _anchor_importance(result.memory)
  head = imp["heads"]["shared"]
  assert set(imp) == {"backbone", "heads"} and set(imp["heads"]) == {"shared"}
  assert float(jnp.sum(head["kernel"])) > 0 and float(jnp.sum(imp["backbone"]["Dense_0"]
                                                                ["kernel"])) > 0
  # The penalty acts on the head: loss_reg > 0 while task 2 trains.
  assert result.curves[1]["loss_reg"][0] > 0


def test_task_incremental_heads_are_not_anchored():
  result = _run("task")
  assert set(_anchor_params(result.memory)) == {"backbone"}


@pytest.mark.parametrize("penalty", ["seed", "clarena"])
def test_parity_modes_consolidate_the_backbone_alone(penalty):
  cfg = dataclasses.replace(CFG, scenario="domain", penalty=penalty)
  assert cfg.consolidated == "backbone"
  result = _run("domain", penalty=penalty, fisher="batch_squared")
  assert set(_anchor_params(result.memory)) == {"backbone"}
  # Asked for explicitly, the parity penalties take the shared head too.
  assert dataclasses.replace(cfg, consolidate="shared").consolidated == "shared"


def test_all_consolidates_the_per_task_heads_too():
  result = _run("task", consolidate="all")
  imp = _anchor_importance(result.memory)
  assert set(imp["heads"]) == {"task_1", "task_2", "task_3"}
  # Slot 0 holds task 1's anchor: its own head has importance, the later heads none (they do
  # not change task 1's logits).
  assert float(jnp.sum(imp["heads"]["task_1"]["kernel"][0])) > 0
  assert float(jnp.sum(imp["heads"]["task_2"]["kernel"][0])) == 0


def test_class_incremental_fisher_masks_unseen_classes():
  """After task 1 only classes 0 and 1 are active: the other head columns get no importance."""
  result = _run("class")
  kernel = np.asarray(_anchor_importance(result.memory)["heads"]["shared"]["kernel"][0])
  assert kernel[:, :2].sum() > 0
  assert np.all(kernel[:, 2:] == 0)


@pytest.mark.parametrize("scenario", ["domain", "class"])
def test_ewc_and_ewc_merged_agree_with_the_head_included(scenario):
  a = _run(scenario, algo="ewc")
  b = _run(scenario, algo="ewc_merged")
  np.testing.assert_allclose(a.acc_matrix, b.acc_matrix, atol=0.02)
  for ca, cb in zip(a.curves, b.curves):
    np.testing.assert_allclose(ca["loss_reg"], cb["loss_reg"], rtol=1e-3, atol=1e-6)


def test_head_consolidation_changes_domain_il_training():
  shared = _run("domain")
  backbone = _run("domain", consolidate="backbone")
  assert shared.curves[1]["loss_reg"][0] > backbone.curves[1]["loss_reg"][0] > 0


# ------------------------------------------------------------------------------------------------
# Training length in iterations, optimizer reset.

def _adam_count(result_or_state):
  return int(result_or_state.opt_state.inner_state[0].count)


def _final_state(cfg):
  net = heads.task_incremental(T, 2, hidden=cfg.hidden)
  seen = {}
  continual.run(cfg, net, synthetic_tasks(200, 0), synthetic_tasks(100, 100),
                on_checkpoint=lambda rs, reason: seen.__setitem__("rs", rs))
  return seen["rs"]


@pytest.mark.parametrize("steps", [3, 13])
def test_steps_per_task_counts_optimizer_steps(steps):
  # Tasks have 200, 193, 186 examples: 7 steps per epoch at batch 32, so 13 = 7 + 6.
  cfg = dataclasses.replace(CFG, epochs=None, steps_per_task=steps, algo="finetune")
  rs = _final_state(cfg)
  assert _adam_count(rs.train_state) == steps  # reset at every task: one task's steps
  assert len(rs.curves[0]["loss"]) == -(-steps // 7)


def test_schedule_cuts_the_last_epoch():
  cfg = dataclasses.replace(CFG, epochs=None, steps_per_task=13)
  assert cfg.schedule(200) == (2, 7, 6)
  assert dataclasses.replace(CFG, epochs=3).schedule(200) == (3, 7, 7)


def test_optimizer_kept_across_tasks_when_not_reset():
  cfg = dataclasses.replace(CFG, epochs=None, steps_per_task=5, algo="finetune",
                            reset_optimizer=False)
  assert _adam_count(_final_state(cfg).train_state) == 5 * T
  kept = _final_state(dataclasses.replace(cfg, algo="ewc"))
  reset = _final_state(dataclasses.replace(cfg, algo="ewc", reset_optimizer=True))
  assert _adam_count(kept.train_state) == 5 * T and _adam_count(reset.train_state) == 5
  assert not np.array_equal(kept.acc, reset.acc) or kept.curves != reset.curves


@pytest.mark.parametrize("changes,flag", [
    ({"epochs": None}, "`epochs`=None and `steps_per_task`=None"),
    ({"steps_per_task": 10}, "`epochs`=2 and `steps_per_task`=10"),
    ({"epochs": None, "steps_per_task": 0}, "`steps_per_task`=0"),
    ({"consolidate": "heads"}, "`consolidate`='heads'"),
    ({"validation_fraction": 1.0}, "`validation_fraction`=1.0"),
    ({"validation_fraction": -0.1}, "`validation_fraction`=-0.1"),
    ({"reset_optimizer": "yes"}, "`reset_optimizer`='yes'"),
    ({"optimizer": "momentum"}, "`optimizer`='momentum' is invalid: expected one of adam, sgd")])
def test_protocol_fields_are_validated(changes, flag):
  with pytest.raises(ValueError, match=flag.replace("(", r"\(")):
    dataclasses.replace(CFG, **changes).validate()


def test_train_chunk_skips_steps_from_stop_step():
  net = heads.task_incremental(T, 2, hidden=(8,))
  data = task_data.TaskData(*(jnp.asarray(a) for a in synthetic_tasks(64, 0)[:3]))
  params = heads.init_params(net, jax.random.key(0), step_lib.scale_pixels(data.inputs[0, :1]))
  tx = step_lib.make_optimizer()
  from ewc_jax import algorithms  # pylint: disable=import-outside-toplevel
  state = step_lib.init_train_state(tx, params, 1e-3)
  order = step_lib.epoch_order(jax.random.key(1), data.counts[0], 64, 64)
  spec = step_lib.Step(net, algorithms.finetune(), tx, batch_size=16, num_steps=4)
  _, m = step_lib.train_chunk(spec, state, step_lib.ChunkInputs(
      data=data, order=order, start_step=jnp.int32(0), task_index=jnp.int32(0), memory=(),
      hyper=algorithms.Hyper(), stop_step=jnp.int32(2)))
  assert np.asarray(m["count"]).tolist() == [16, 16, 0, 0]
