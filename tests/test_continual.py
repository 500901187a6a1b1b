import dataclasses

import jax
import numpy as np
import pytest

from ewc_jax import continual, heads
from ewc_jax.continual.programs import SUBSET_STREAM, ConsolidateInputs
from tests import runs

D, T = 16, 3


def synthetic_tasks(n_per_task, seed, task_seed=0):
  """T binary tasks on shared inputs statistics, each labelled by its own random projection."""
  rng = np.random.default_rng(seed)
  directions = np.random.default_rng(task_seed).normal(size=(T, D))
  xs, ys = [], []
  sizes = [n_per_task - 7 * t for t in range(T)]  # different sizes: one program must serve all
  for n, direction in zip(sizes, directions):
    x = rng.integers(0, 256, (n, D)).astype(np.uint8)
    y = ((x.astype(np.float32) / 255 - 0.5) @ direction > 0).astype(np.int32)
    xs.append(x)
    ys.append(y)
  from ewc_jax.continual.task_data import pad_tasks  # pylint: disable=import-outside-toplevel
  return pad_tasks(xs, ys)


CFG = continual.Config(epochs=2, batch_size=32, hidden=(32,), lam=100.0, chunk_steps=4,
                       fisher_batch_size=64)


def run(cfg, seed=0):
  net = heads.task_incremental(T, 2, hidden=cfg.hidden)
  return continual.run(cfg, net, synthetic_tasks(200, seed), synthetic_tasks(100, seed + 100))


@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
def test_no_compilation_after_the_first_task(backbone):
  if backbone == "mlp":
    cfg = dataclasses.replace(CFG, hidden=(24,), seed=11)
    train, test = synthetic_tasks(200, 0), synthetic_tasks(100, 1)
  else:  # 8x8x3 images; 2 steps per chunk: the last chunk of an epoch is a partial one
    cfg = dataclasses.replace(CFG, backbone=backbone, batch_size=16, chunk_steps=2, epochs=1,
                              fisher_batch_size=16, seed=11)
    train, test = runs.image_tasks(40, 0), runs.image_tasks(20, 1)
  net = continual.make_network(cfg, [[0, 1]] * T)
  result, compiled, late = runs.run_counting_compiles(cfg, net, train, test)
  assert compiled > 0, "the ahead-of-time compilation should be observed"
  assert late == []
  assert result.acc_matrix.shape == (T, T)


# A second backbone for what the default suite checks on the mlp / cnn and on a user's BatchNorm
# module (tests/test_backbones.py): its shared run costs ~45 s of compiling on 2 cores.
@pytest.mark.extended
@pytest.mark.xdist_group("resnet18_run")  # one process builds the shared run
def test_no_compilation_after_the_first_task_resnet18(resnet18_run):
  """ResNet-18 with BatchNorm: the model state changes every step, still one program."""
  assert resnet18_run.compiled > 0
  assert resnet18_run.late_compiles == []
  assert set(resnet18_run.result.model_state) == {"batch_stats"}


def test_same_seed_same_results_other_seed_differs():
  a, b = run(CFG), run(CFG)
  np.testing.assert_array_equal(a.acc_matrix, b.acc_matrix)
  assert a.curves == b.curves
  c = run(dataclasses.replace(CFG, seed=1))
  assert not np.array_equal(a.acc_matrix, c.acc_matrix) or a.curves != c.curves


def test_ewc_remembers_better_than_finetune():
  strong = dataclasses.replace(CFG, lam=1e3, epochs=10, lr=1e-2)
  ewc = run(strong)
  ft = run(dataclasses.replace(strong, algo="finetune"))
  assert ewc.acc_matrix[0, 0] > 0.8 and ft.acc_matrix[0, 0] > 0.8
  # After the last task, task 1 is better kept with EWC.
  assert ewc.acc_matrix[-1, 0] > ft.acc_matrix[-1, 0]
  assert all(c["loss_reg"][-1] > 0 for c in ewc.curves[1:])
  assert all(c["loss_reg"] == [0.0] * strong.epochs for c in ft.curves)


@pytest.mark.parametrize("field,value", [
    ("algo", "bogus"), ("penalty", "nope"), ("fisher", "exact"), ("lam", 0.0),
    ("lam", float("nan")), ("p", -1.0), ("lr", 0.0), ("epochs", 0), ("batch_size", -1),
    ("fisher_batch_size", 0)])
def test_config_validation_names_the_flag(field, value):
  with pytest.raises(ValueError, match=f"`{field}`="):
    dataclasses.replace(CFG, **{field: value}).validate()


@pytest.mark.parametrize("fisher", ["empirical", "true", "sampled", "predicted", "batch_squared"])
def test_every_fisher_kind_runs(fisher):
  result = run(dataclasses.replace(CFG, fisher=fisher, epochs=1))
  assert np.all(np.isfinite(result.acc_matrix))
  assert all(np.isfinite(result.curves[-1]["loss_reg"]))


@pytest.mark.parametrize("penalty", ["seed", "clarena"])
def test_parity_penalties_run(penalty):
  result = run(dataclasses.replace(CFG, penalty=penalty, fisher="batch_squared", epochs=1,
                                   fisher_normalize=penalty == "seed"))
  assert result.curves[1]["loss_reg"][0] > 0


def test_fisher_examples_is_the_fisher_of_random_rows():
  """fisher_examples=n: the importance of a task is fisher_diagonal on the n rows that
  ewc_jax.subset.random_rows draws from the Fisher key folded with SUBSET_STREAM."""
  from ewc_jax import fisher as fisher_lib  # pylint: disable=import-outside-toplevel
  from ewc_jax import subset  # pylint: disable=import-outside-toplevel
  from ewc_jax.continual import step as train_lib  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(CFG, algo="online_ewc", fisher="true", fisher_examples=20)
  train = synthetic_tasks(200, 0)
  net = heads.task_incremental(T, 2, hidden=cfg.hidden)
  algo = continual.make_algorithm(cfg)
  programs = continual.programs(cfg, net, algo, train)
  params, model_state = programs.init(jax.random.key(3))
  theta = heads.consolidated(net, params, cfg.consolidated)
  key, hyper, task = jax.random.key(5), continual.hyper_of(cfg), 1

  def importance(c):
    memory = continual.programs(c, net, algo, train).consolidate(
        algo.init(theta, T), ConsolidateInputs(params, model_state, train, task, key, hyper))
    return jax.tree.map(lambda a: np.asarray(a[0]), memory.importance)

  rows = np.asarray(subset.random_rows(jax.random.fold_in(key, SUBSET_STREAM),
                                       np.arange(train.inputs.shape[1]) < train.counts[task], 20))
  assert rows.sum() == 20
  logits = heads.consolidated_logits_fn(net, params, task, model_state)
  want = fisher_lib.fisher_diagonal(
      lambda th, xb: logits(th, train_lib.scale_pixels(xb)), theta, train.inputs[task][rows],
      train.labels[task][rows], kind="true")
  got = importance(cfg)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-9), got, want)
  every = importance(dataclasses.replace(cfg, fisher_examples=None))
  assert not all(np.allclose(e, g) for e, g in zip(jax.tree.leaves(every), jax.tree.leaves(got)))


def test_fisher_examples_of_at_least_every_row_is_the_default():
  a = run(dataclasses.replace(CFG, epochs=1))
  b = run(dataclasses.replace(CFG, epochs=1, fisher_examples=10_000))
  np.testing.assert_array_equal(a.acc_matrix, b.acc_matrix)
  for x, y in zip(jax.tree.leaves(a.memory), jax.tree.leaves(b.memory)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("value", [0, -5, 2.5, True])
def test_fisher_examples_refused_unless_a_positive_integer(value):
  with pytest.raises(ValueError, match=r"`fisher_examples`=.* expected an integer >= 1"):
    dataclasses.replace(CFG, fisher_examples=value).validate()
