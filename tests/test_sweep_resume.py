"""Sweeps killed (SIGKILL), interrupted (SIGTERM) and resumed: every config's accuracy matrix
and curves bit-identical to the uninterrupted sweep; with --max_parallel chunks and on a
sharded mesh of forced host devices. With --max_parallel=2 the first task is trained once per
seed (the configs differ only in λ) in a chunk of its own, checkpointed under first_task_0.

Positions are reached through the test-only EWC_JAX_TEST_HANG_AT pause
(tests/hooks/sitecustomize.py; the position of the chunk being trained). Tiny protocol: 3 tasks
of 400 examples of the session's tiny MNIST,
batch 16, chunks of 16 steps, 2 epochs, MLP 784-32; 4 configs (lam x seed).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pause
from tests.xla_flags import with_xla_flags as _with_xla_flags

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ("--benchmark=split_mnist", "--lam=1,1000", "--seeds=0,1", "--num_tasks=3",
            "--max_examples=400", "--batch_size=16", "--hidden=32", "--chunk_steps=16",
            "--epochs=2", "--noprogress", "--noplots")


def command(workdir, data_dir, *extra, env=None):
  return ([sys.executable, "-m", "experiments.sweep", *PROTOCOL, f"--data_dir={data_dir}",
           f"--workdir={workdir}", *extra],
          {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def run_ok(workdir, data_dir, *extra, env=None):
  cmd, env = command(workdir, data_dir, *extra, env=env)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def start_paused(workdir, data_dir, at, *extra, env=None):
  marker = pause.marker_path(workdir, at)
  cmd, env = command(workdir, data_dir, *extra, env={**(env or {}), **pause.pause_env(at, marker)})
  return pause.start_paused(cmd, env, at, marker)


def per_config(workdir):
  """Every config's swept values, accuracy matrix (float64 repr: bit for bit) and curves."""
  res = json.loads((Path(workdir) / "results.json").read_text())
  return [{k: c[k] for k in ("lam", "seed", "acc_matrix", "curves", "average_accuracy")}
          for c in res["configs"]]


def chunk_steps(workdir, chunk):
  """The step folders of a chunk (an int) or of the shared first task's chunk ("first_task_0")."""
  folder = Path(workdir) / "checkpoints" / "group_0" / (
      chunk if isinstance(chunk, str) else f"chunk_{chunk}")
  return sorted(os.listdir(folder), key=lambda n: (len(n), n)) if folder.is_dir() else []


EVERY = ("--max_parallel=2", "--checkpoint_every=16")  # two chunks of 2 configs


@pytest.fixture(scope="module")
def reference(tiny_mnist_dir, tmp_path_factory):
  """The uninterrupted sweep."""
  ref = tmp_path_factory.mktemp("sweep_reference") / "run"
  run_ok(ref, tiny_mnist_dir, *EVERY)
  want = per_config(ref)
  assert len(want) == 4 and all(c["acc_matrix"][0][0] > 0.8 for c in want)
  return want


def test_sweep_killed_in_each_chunk_then_resumed_is_bit_identical_per_config(
    reference, tiny_mnist_dir, tmp_path):
  """SIGKILL mid-task in chunk 1, then mid-epoch in chunk 2, then finished: all 4 matrices and
  curves equal the uninterrupted sweep's. (Both chunks start at task 2 from the shared first
  task, trained and checkpointed before chunk 1.)"""
  w = tmp_path / "run"
  # 1. Chunk 1 paused in task 2 after step 16 (a chunk checkpoint there): SIGKILL.
  proc = start_paused(w, tiny_mnist_dir, "1:0:16", *EVERY)
  # A second sweep on the locked workdir is refused at once.
  cmd, env = command(w, tiny_mnist_dir, *EVERY)
  second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert second.returncode == 2 and f"pid {proc.pid}" in second.stderr, second.stderr[-2000:]
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert chunk_steps(w, "first_task_0") and chunk_steps(w, 0) and not chunk_steps(w, 1)
  # A changed grid is refused, naming what differs (nothing is trained).
  cmd, env = command(w, tiny_mnist_dir, *EVERY, "--lam=1,10")
  bad = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  lines = [l for l in bad.stderr.splitlines() if l.startswith("error: ")]
  assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-2000:]
  assert "values (checkpoint: {'lam': [1.0, 1000.0]" in lines[0], lines[0]
  assert "--force_restart" in lines[0] and "Traceback" not in bad.stderr
  # 2. Resumes chunk 1 from task 2, step 16 and finishes it; chunk 2, from the saved first task,
  #    paused in task 2, epoch 1, step 16 (a position the resumed chunk 1 never passes again):
  #    SIGKILL.
  proc = start_paused(w, tiny_mnist_dir, "1:0:16", *EVERY)
  proc.send_signal(signal.SIGKILL)
  out, _ = proc.communicate(timeout=60)
  assert "chunk 1/2: resuming from" in out and "(task 2, epoch 1, step 16)" in out, out
  assert chunk_steps(w, 1)
  # 3. Finishes: chunk 1 restored as done, chunk 2 resumed from its chunk checkpoint.
  proc = run_ok(w, tiny_mnist_dir, *EVERY)
  assert "chunk 1/2: resuming from" in proc.stdout and "(all tasks done)" in proc.stdout
  lines = [line for line in proc.stdout.splitlines() if "chunk 2/2: resuming from" in line]
  assert len(lines) == 1 and "(task 2, epoch 1, step 16)" in lines[0], proc.stdout
  assert "first task" not in proc.stdout  # chunk 2 restored: the first task is not needed
  got = per_config(w)
  for k, (a, b) in enumerate(zip(got, reference)):
    assert a == b, f"config {k} differs"


def test_sweep_sigterm_saves_the_position_and_resumes_bit_identical(reference, tiny_mnist_dir,
                                                                     tmp_path):
  """Paused between two chunk checkpoints (task 1, epoch 2, step 16 with --checkpoint_every=64
  saves none there), in the shared first task: SIGTERM saves that position, one line, exit 143;
  the resumed sweep equals the uninterrupted one."""
  w = tmp_path / "run"
  flags = ("--max_parallel=2", "--checkpoint_every=64")  # not part of the identity
  proc = start_paused(w, tiny_mnist_dir, "0:1:16", *flags)
  assert not chunk_steps(w, "first_task_0") and not chunk_steps(w, 0)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  assert "Traceback" not in err
  assert err.strip().splitlines()[-1] == ("interrupted (SIGTERM) at task 1, epoch 2, step 16; "
                                          "saved; run the same command to resume"), err
  assert chunk_steps(w, "first_task_0") == ["0"] and not chunk_steps(w, 0)
  proc = run_ok(w, tiny_mnist_dir, *flags)
  assert "first task 1/1: resuming from" in proc.stdout
  assert "(task 1, epoch 2, step 16)" in proc.stdout
  assert per_config(w) == reference


@pytest.mark.extended
def test_sharded_sweep_killed_and_resumed_on_the_same_mesh(tiny_mnist_dir, tmp_path):
  """Two forced host devices: the config axis sharded over a (2, 1) mesh; each device's shard
  saved and restored onto the same mesh."""
  env = {"XLA_FLAGS": _with_xla_flags("--xla_force_host_platform_device_count=2"),
         "JAX_PLATFORMS": "cpu"}
  ref = tmp_path / "reference"
  run_ok(ref, tiny_mnist_dir, env=env)
  layout = json.loads((ref / "results.json").read_text())["layout"][0]
  assert (layout["config_parallel"], layout["num_devices"]) == (2, 2)
  w = tmp_path / "run"
  proc = start_paused(w, tiny_mnist_dir, "1:1:16", "--checkpoint_every=16", env=env)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  proc = run_ok(w, tiny_mnist_dir, "--checkpoint_every=16", env=env)
  assert "(task 2, epoch 2, step 16)" in proc.stdout, proc.stdout
  assert per_config(w) == per_config(ref)
  # Another device count is another layout: refused, not restored onto a different mesh.
  cmd, env1 = command(w, tiny_mnist_dir, "--checkpoint_every=16", "--force_restart=false",
                      env={"JAX_PLATFORMS": "cpu"})
  bad = subprocess.run(cmd, cwd=ROOT, env=env1, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "layout" in bad.stderr and "Traceback" not in bad.stderr, \
      bad.stderr[-2000:]
