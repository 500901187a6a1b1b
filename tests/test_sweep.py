"""Sweeps: each config of a vmapped (chunked, sharded) sweep = the single run with that config."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ewc_jax import continual, heads

from ewc_jax.continual import sweep
from tests import runs
from tests.test_continual import T, synthetic_tasks
from tests.xla_flags import with_xla_flags as _with_xla_flags

ROOT = Path(__file__).resolve().parents[1]
BASE = continual.Config(epochs=2, batch_size=32, hidden=(32,), chunk_steps=4,
                        fisher_batch_size=64)
# Different lam, p (2 = the merged fast path in the single run), lr and seed in one sweep.
CONFIGS = [dataclasses.replace(BASE, lam=10.0, p=1.5, lr=1e-2, seed=0),
           dataclasses.replace(BASE, lam=1000.0, p=2.0, lr=3e-3, seed=1),
           dataclasses.replace(BASE, lam=100.0, p=3.0, lr=1e-2, seed=2)]


def data():
  return synthetic_tasks(200, 0), synthetic_tasks(100, 100)


def net():
  return heads.task_incremental(T, 2, hidden=BASE.hidden)


@pytest.fixture(scope="module")
def full_sweep():
  return sweep.run(CONFIGS, net(), *data())


def test_each_config_equals_its_single_run_bit_for_bit(full_sweep):
  """On one CPU device the configs are mapped (programs.map_configs): each config's matrix and
  curves are its single run's, bit for bit (p is swept, so the single run reads p at run time
  too: ``dynamic_p``; with p fixed at trace time, p = 2 takes the merged path, another sum)."""
  assert not full_sweep.layout.vectorized
  assert full_sweep.acc_matrix.shape == (len(CONFIGS), T, T)
  assert full_sweep.swept == ("lam", "p", "lr", "seed")
  for k, cfg in enumerate(CONFIGS):
    single = continual.run(cfg, net(), *data(), dynamic_p=True)
    np.testing.assert_array_equal(full_sweep.acc_matrix[k], single.acc_matrix)
    assert full_sweep.curves[k] == single.curves
  assert full_sweep.acc_matrix[:, 0, 0].min() > 0.7  # they learn (a meaningful comparison)


def test_vmapped_configs_equal_their_single_runs_to_float_tolerance(full_sweep):
  """vectorize=True: each config equals the mapped sweep's, i.e. its single run (the test
  above), to float tolerance."""
  vmapped = sweep.run(CONFIGS, net(), *data(), vectorize=True)
  assert vmapped.layout.vectorized
  np.testing.assert_allclose(vmapped.acc_matrix, full_sweep.acc_matrix, atol=1e-6)
  for got_k, want_k in zip(vmapped.curves, full_sweep.curves):
    for got, want in zip(got_k, want_k):
      for name in ("loss_cls", "loss_reg", "acc"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6)
  assert [s["average_accuracy"] for s in vmapped.summaries] == pytest.approx(
      [s["average_accuracy"] for s in full_sweep.summaries], abs=1e-6)


def test_mapped_sweeps_refuse_several_devices():
  import jax  # pylint: disable=import-outside-toplevel
  from ewc_jax import errors  # pylint: disable=import-outside-toplevel
  with pytest.raises(errors.SettingError, match="`vectorize`=False is invalid: expected True or None on 2 devices"):
    sweep.run(CONFIGS, net(), *data(), devices=[jax.devices()[0]] * 2, vectorize=False)


class _Bars:
  """A progress callback counting the bars of each task (one per chunk that trains it)."""

  def __init__(self):
    self.tasks = []

  def __call__(self, task, total, done=0):
    self.tasks.append(task)
    return runs._Bar()  # pylint: disable=protected-access


@pytest.mark.parametrize("algo,values", [
    ("ewc", {"lam": [10.0, 100.0, 1000.0], "seed": [0, 1]}),          # 2 groups, 3 chunks
    # 1 group, dynamic p (extended: a sweep over p is also the bit-for-bit test above)
    pytest.param("online_ewc", {"gamma": [0.5, 1.0], "p": [1.5, 2.0]},
                 marks=pytest.mark.extended)])
def test_shared_first_task_is_bit_identical_to_the_unshared_sweep(algo, values):
  """The first task trained once per group (configs differing only in λ, p, γ), with the
  sweep's own programs, then fanned out: every matrix and curve equals the unshared sweep's
  bit for bit, and each config its single run (to the tolerance of the test above)."""
  configs = sweep.grid(dataclasses.replace(BASE, algo=algo), **values)
  bars = [_Bars(), _Bars()]
  shared, unshared = (sweep.run(configs, net(), *data(), max_parallel=2, progress=bars[i],
                                share_first_task=i == 0) for i in range(2))
  groups = sweep.prefix_groups(configs)
  assert bars[0].tasks.count(0) == -(-(max(groups) + 1) // 2) < shared.layout.num_chunks
  assert bars[1].tasks.count(0) == unshared.layout.num_chunks
  assert bars[0].tasks.count(1) == bars[1].tasks.count(1) == shared.layout.num_chunks
  np.testing.assert_array_equal(shared.acc_matrix, unshared.acc_matrix)
  assert shared.curves == unshared.curves  # floats, compared exactly
  for k, cfg in enumerate(configs):
    single = continual.run(cfg, net(), *data())
    np.testing.assert_allclose(shared.acc_matrix[k], single.acc_matrix, atol=1e-6)
    if groups[k] == groups[0]:  # the first task: its group's
      assert shared.curves[k][0] == shared.curves[0][0]


def test_max_parallel_chunks_give_the_same_results(full_sweep):
  chunked = sweep.run(CONFIGS, net(), *data(), max_parallel=2)
  assert chunked.layout.num_chunks == 2 and chunked.layout.padding == 1
  np.testing.assert_array_equal(chunked.acc_matrix, full_sweep.acc_matrix)
  rows = sweep.table(chunked)
  assert [r["average_accuracy"] for r in rows] == sorted(
      (r["average_accuracy"] for r in rows), reverse=True)


@pytest.mark.parametrize("k,devices,max_parallel,want", [
    (12, 4, None, (1, 12, 4, 1)), (6, 4, None, (1, 8, 4, 1)), (3, 4, None, (1, 4, 2, 2)),
    (1, 4, None, (1, 1, 1, 4)), (10, 1, 4, (3, 4, 1, 1)), (5, 4, 2, (3, 2, 2, 2))])
def test_plan(k, devices, max_parallel, want):
  layout = sweep.plan(k, devices, max_parallel)
  assert (layout.num_chunks, layout.chunk_size, layout.config_parallel,
          layout.data_parallel) == want
  assert layout.chunk_size <= (max_parallel or layout.chunk_size)
  assert layout.num_chunks * layout.chunk_size >= k


def test_grid_and_validation_check_every_value():
  configs = sweep.grid(BASE, lam=[1.0, 10.0], seed=[0, 1, 2])
  assert [(c.lam, c.seed) for c in configs][:4] == [(1, 0), (1, 1), (1, 2), (10, 0)]
  with pytest.raises(ValueError, match="`lam`=0"):
    sweep.validate(sweep.grid(BASE, lam=[1.0, 0.0]))
  with pytest.raises(ValueError, match="`p`=-1"):
    sweep.validate(sweep.grid(BASE, p=[2.0, -1.0]))
  with pytest.raises(ValueError, match="`epochs` differs"):
    sweep.validate([BASE, dataclasses.replace(BASE, epochs=3)])
  with pytest.raises(ValueError, match="cannot be swept"):
    sweep.grid(BASE, epochs=[1, 2])


FOUR_DEVICES = textwrap.dedent("""
    import dataclasses, json, jax, numpy as np
    from ewc_jax import heads
    from ewc_jax.continual import sweep
    from tests.test_sweep import CONFIGS, data, net
    assert jax.device_count() == 4, jax.devices()
    configs = CONFIGS + [dataclasses.replace(c, seed=c.seed + 10) for c in CONFIGS]  # K = 6
    one = sweep.run(configs, net(), *data(), devices=jax.devices()[:1])
    four = sweep.run(configs, net(), *data())      # 'config' axis: 4 devices, K padded to 8
    pair = sweep.run(configs[:2], net(), *data())  # 2 configs x 2-way data parallel
    print(json.dumps({
        "layouts": [four.layout._asdict(), pair.layout._asdict()],
        "config_sharded": float(np.abs(four.acc_matrix - one.acc_matrix).max()),
        "data_parallel": float(np.abs(pair.acc_matrix - one.acc_matrix[:2]).max()),
        "loss_reg_dp": float(np.abs(np.array(pair.curves[0][-1]["loss_reg"])
                                    - np.array(one.curves[0][-1]["loss_reg"])).max()),
    }))
""")


@pytest.mark.extended
def test_sharded_over_four_forced_cpu_devices_equals_unsharded():
  env = {**os.environ, "XLA_FLAGS": _with_xla_flags("--xla_force_host_platform_device_count=4"),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  four, pair = out["layouts"]
  assert (four["config_parallel"], four["chunk_size"], four["num_devices"]) == (4, 8, 4)
  assert (pair["config_parallel"], pair["data_parallel"]) == (2, 2)
  assert out["config_sharded"] <= 1e-6
  assert out["data_parallel"] <= 1e-6
  assert out["loss_reg_dp"] <= 1e-4


TWO_PROCESSES = textwrap.dedent("""
    import json, sys, jax
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    from ewc_jax.continual import sweep
    from tests.test_sweep import CONFIGS, data, net
    r = sweep.run(CONFIGS, net(), *data())   # mesh over both processes' devices
    print(json.dumps({"devices": [jax.device_count(), jax.local_device_count()],
                      "layout": r.layout._asdict(), "acc": r.acc_matrix.tolist()}))
""")


@pytest.mark.extended
def test_two_processes_distributed_equal_one_process(full_sweep):
  """Multi-host on one machine: 2 processes x 2 CPU devices, jax.distributed (gloo)."""
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{sock.getsockname()[1]}"
  env = {**os.environ, "XLA_FLAGS": _with_xla_flags("--xla_force_host_platform_device_count=2"),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, address, str(i)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  for out, _ in outs:
    res = json.loads(out.strip().splitlines()[-1])
    assert res["devices"] == [4, 2]
    assert (res["layout"]["config_parallel"], res["layout"]["data_parallel"]) == (2, 2)
    np.testing.assert_allclose(res["acc"], full_sweep.acc_matrix, atol=1e-6)


def run_cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", "experiments.sweep", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, **(env or {})})


@pytest.mark.extended
def test_cli_sweep_loads_the_programs_an_earlier_sweep_saved(tiny_mnist_dir, tmp_path):
  """A sweep saves its compiled programs (one entry for its two chunks, one for the shared
  first task's single representative: mapped configs, layouts mapped2 and mapped1); a sweep
  over other λ values (arguments of the programs) loads them (train_chunk is not traced again)
  and gives the numbers of the same sweep with --nocompile_cache."""
  env = {"EWC_JAX_CACHE_DIR": str(tmp_path / "cache"), "JAX_LOG_COMPILES": "1"}
  common = ("--benchmark=split_mnist", "--algo=ewc", "--num_tasks=2", "--max_examples=200",
            "--epochs=1", "--hidden=29", "--max_parallel=2", "--noprogress",
            f"--data_dir={tiny_mnist_dir}")
  recs, logs = [], []
  for i, extra in enumerate((["--lam=1,10,30,100"], ["--lam=3,300,1000,3000"],
                             ["--lam=3,300,1000,3000", "--nocompile_cache"])):
    proc = run_cli(*common, *extra, f"--workdir={tmp_path / str(i)}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs.append(json.loads((tmp_path / str(i) / "results.json").read_text()))
    logs.append(proc.stderr)
    assert sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache" / "executables").glob(
        "*.executables")) == ["mapped1.executables", "mapped2.executables"]
  assert logs[0].count("Finished tracing train_chunk") == 2  # two chunks + the first task
  assert "Finished tracing train_chunk" not in logs[1]
  assert "Finished tracing train_chunk" in logs[2]
  assert [c["acc_matrix"] for c in recs[1]["configs"]] == [
      c["acc_matrix"] for c in recs[2]["configs"]]


def test_cli_real_data_smoke(tiny_mnist_dir, tmp_path):
  proc = run_cli("--benchmark=split_mnist", "--algo=ewc", "--lam=1,1000", "--seeds=0,1",
                 "--num_tasks=2", "--max_examples=300", f"--data_dir={tiny_mnist_dir}",
                 f"--workdir={tmp_path}", "--noprogress", "--max_parallel=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "results.json").read_text())
  assert res["num_configs"] == 4 and res["acc_matrix_shape"] == [4, 2, 2]
  assert res["swept"] == ["lam", "seed"] and res["benchmark"]["input_norm"] == "none"
  assert [(c["lam"], c["seed"]) for c in res["configs"]] == [(1, 0), (1, 1), (1000, 0),
                                                                (1000, 1)]
  assert all(c["acc_matrix"][0][0] > 0.9 for c in res["configs"])
  table = res["table"]
  assert len(table) == 2 and table[0]["average_accuracy"] >= table[1]["average_accuracy"]
  assert table[0]["seeds"] == [0, 1]
  assert (tmp_path / "average_accuracy.png").stat().st_size > 0
  assert "AA (%)" in proc.stdout


@pytest.mark.parametrize("flag,needle", [
    ("--lam=10,0", "--lam=0.0"), ("--lam=1,x", "--lam=1,x"), ("--p=2,-1", "--p=-1.0"),
    ("--max_parallel=0", "--max_parallel=0"), ("--benchmark=cifar", "benchmark"),
    ("--optimizer=lbfgs", "--optimizer='lbfgs'"), ("--input_norm=z", "--input_norm='z'")])
def test_cli_bad_flag_one_line_exit_2_nothing_written(flag, needle, tmp_path):
  proc = run_cli(flag, f"--workdir={tmp_path / 'out'}", "--noprogress")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert needle in proc.stderr and "Traceback" not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not (tmp_path / "out" / "results.json").exists()


def test_sgd_sweep_over_lr_equals_its_single_runs():
  """--optimizer=sgd: a sweep over lr (the lr lives in the optimizer state) gives each single
  run, and a larger lr trains further on the first task (SGD is slow at 1e-3)."""
  base = dataclasses.replace(BASE, optimizer="sgd", algo="finetune", epochs=1)
  configs = [dataclasses.replace(base, lr=lr) for lr in (1e-3, 0.3)]
  swept = sweep.run(configs, net(), *data())
  assert swept.swept == ("lr",)
  for k, cfg in enumerate(configs):
    single = continual.run(cfg, net(), *data())
    np.testing.assert_array_equal(swept.acc_matrix[k], single.acc_matrix)
    assert swept.curves[k] == single.curves
  assert swept.curves[1][0]["loss_cls"][0] < swept.curves[0][0]["loss_cls"][0]


@pytest.mark.extended
def test_cnn_sweep_over_lam_and_seeds_equals_its_single_runs():
  """--backbone=cnn: a sweep over λ × seeds gives each config's single run with the MLP's
  tolerances, mapped (the default on one CPU) and vmapped. Batched convolutions (a kernel per
  config) are other XLA kernels than single ones, so every vmapped step differs in the last
  bits (~1e-7) and training can amplify that: with raw [0, 1] pixels the CNN sits on a plateau
  then escapes it abruptly, and there the trajectories drift apart (~1e-3 in the losses);
  centred inputs learn smoothly and stay equal. Mapped, the training steps are the single
  run's bit for bit, but the Fisher's gradient through the second convolution is compiled to
  another kernel inside the loop (the first layer's importance ~1e-9 apart)."""
  base = continual.Config(backbone="cnn", epochs=2, batch_size=16, chunk_steps=2,
                          fisher_batch_size=16)
  configs = sweep.grid(base, lam=[10.0, 100.0], seed=[0, 1])
  cnn = continual.make_network(base, [[0, 1]] * runs.T)
  train, test = runs.image_tasks(64, 0), runs.image_tasks(32, 1)
  centred = lambda x: x.astype(np.float32) / 255 - 0.5  # noqa: E731
  swept = sweep.run(configs, cnn, train, test, preprocess=centred, vectorize=True)
  mapped = sweep.run(configs, cnn, train, test, preprocess=centred)
  assert swept.swept == ("lam", "seed")
  for k, cfg in enumerate(configs):
    single = continual.run(cfg, cnn, train, test, preprocess=centred)
    for result in (mapped, swept):
      np.testing.assert_allclose(result.acc_matrix[k], single.acc_matrix, atol=1e-6)
      for got, want in zip(result.curves[k], single.curves):
        for name in ("loss_cls", "loss_reg", "acc"):
          np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6)
  assert swept.acc_matrix[:, 0, 0].min() > 0.9  # they learn (a meaningful comparison)
  assert swept.curves[2][1]["loss_reg"][-1] > swept.curves[0][1]["loss_reg"][-1] > 0


@pytest.mark.extended
def test_cli_sweep_with_shuffled_classes_trains_each_seed_on_its_own_pairs(tiny_mnist_dir,
                                                                           tmp_path):
  """--shuffle_classes: each seed its own class pairs (van de Ven's Split MNIST), recorded per
  config; the sweep's seed-1 config is the single run with --seed=1 --shuffle_classes."""
  common = ("--algo=ewc", "--lam=100", "--num_tasks=2", "--max_examples=200", "--epochs=1",
            "--hidden=16", "--noprogress", "--shuffle_classes", f"--data_dir={tiny_mnist_dir}")
  proc = run_cli(*common, "--seeds=0,1", f"--workdir={tmp_path / 'sweep'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / "sweep" / "results.json").read_text())
  groups = [c["class_groups"] for c in res["configs"]]
  assert groups[0] != groups[1] and "class_groups" not in res["benchmark"]
  single = subprocess.run([sys.executable, "-m", "experiments.split_mnist", *common, "--seed=1",
                           "--validation_fraction=0.1", "--nocheckpoint", "--noplots",
                           f"--workdir={tmp_path / 'single'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  one = json.loads((tmp_path / "single" / "results.json").read_text())
  assert one["runs"][0]["class_groups"] == groups[1]
  assert one["runs"][0]["acc_matrix"] == res["configs"][1]["acc_matrix"]
