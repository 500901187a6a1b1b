"""The command line killed with SIGKILL and resumed: results bit-identical to an uninterrupted run.

Kills are deterministic: the run pauses at a given position through the test-only
EWC_JAX_TEST_HANG_AT pause that tests/hooks/sitecustomize.py installs in the subprocess (after
that position's checkpoint, if any, is saved; production code has no hook) and writes a
marker file; the test waits for the marker, then sends SIGKILL. The kill *inside* a save patches
orbax's rename (tests only) to SIGKILL the process just before a step folder is committed.
Tiny protocol: 3 tasks of 400 real MNIST examples, batch 16 (25 steps per epoch, chunks of 16
steps: positions step 16 and epoch ends), 2 epochs, MLP 784-64.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pause

import cli_batch

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ("--num_tasks=3", "--max_examples=400", "--batch_size=16", "--hidden=64",
            "--chunk_steps=16",
            "--epochs=2", "--noprogress", "--noplots")

# Runs the CLI with orbax's step-folder rename replaced by SIGKILL at its KILL_AT_COMMIT-th call.
KILL_IN_SAVE = r"""
import os, runpy, signal, sys
import orbax.checkpoint._src.path.async_path as ap
orig, count = ap.rename, [0]
async def rename(src, dst, *a, **k):
  if "orbax-checkpoint-tmp" not in str(dst):   # a step folder's commit (not an item's)
    count[0] += 1
    if count[0] == int(os.environ["KILL_AT_COMMIT"]):
      os.kill(os.getpid(), signal.SIGKILL)
  return await orig(src, dst, *a, **k)
ap.rename = rename
sys.argv = ["split_mnist"] + sys.argv[1:]
runpy.run_module("experiments.split_mnist", run_name="__main__")
"""


def cli(workdir, data_dir, *extra, env=None, wrapper=None):
  cmd = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m",
                                                          "experiments.split_mnist"]
  return cmd + [*PROTOCOL, f"--data_dir={data_dir}", f"--workdir={workdir}", *extra], {
      **os.environ, "PYTHONPATH": str(ROOT), **(env or {})}


def run_ok(workdir, data_dir, *extra):
  cmd, env = cli(workdir, data_dir, *extra)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def run_until_hang(workdir, data_dir, at, *extra):
  """Starts the CLI, waits until it pauses at position ``at`` ("task:epoch:step"), SIGKILLs it."""
  marker = pause.marker_path(workdir, at)
  cmd, env = cli(workdir, data_dir, *extra, env=pause.pause_env(at, marker))
  proc = pause.start_paused(cmd, env, at, marker, timeout=600)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  return proc


def numbers(workdir):
  """results.json without timings and provenance (the environment, and the experiment's
  settings: checkpointing differs between the runs compared): every number must match bit for
  bit."""
  res = json.loads((Path(workdir) / "results.json").read_text())
  res.pop("timings")
  res.pop("environment")
  res.pop("experiment")
  for r in res["runs"]:
    r.pop("timings")
    r.pop("resumed_from")
  return res


def final_state(workdir):
  """The arrays of the newest checkpoint (the finished run: params, Adam state, anchors)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  folder = Path(workdir) / "checkpoints" / "seed_0"
  with ocp.CheckpointManager(folder, item_names=("state", "meta")) as mgr:
    out = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  import jax  # pylint: disable=import-outside-toplevel
  return out.meta, {jax.tree_util.keystr(k): np.asarray(v)
                    for k, v in jax.tree_util.tree_flatten_with_path(out.state)[0]}


def steps_on_disk(workdir):
  folder = Path(workdir) / "checkpoints" / "seed_0"
  return sorted(os.listdir(folder), key=lambda n: (len(n), n))


@pytest.fixture(scope="module")
def reference(tiny_mnist_dir, tmp_path_factory):
  """The uninterrupted run (checkpointing every chunk, which must not change any number)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  run_ok(workdir, tiny_mnist_dir, "--checkpoint_every=16")
  return workdir


def test_same_seed_same_numbers_and_checkpointing_changes_nothing(reference, tiny_mnist_dir,
                                                                   tmp_path):
  run_ok(tmp_path / "again", tiny_mnist_dir)                     # no chunk checkpoints
  assert numbers(tmp_path / "again") == numbers(reference)
  assert steps_on_disk(reference) == ["13", "14"]  # 5 saves per task, --keep=2 by default


def test_killed_three_times_then_resumed_is_bit_identical(reference, tiny_mnist_dir, tmp_path):
  """Killed mid-epoch, killed inside a save, killed right before the Fisher pass; then finished."""
  w = tmp_path / "run"
  every = "--checkpoint_every=16"
  # 1. Paused in task 1, epoch 2, after step 16 of 25 (checkpoint 2 saved there): SIGKILL.
  run_until_hang(w, tiny_mnist_dir, "0:1:16", every)
  assert steps_on_disk(w) == ["1", "2"]
  # 2. Resumes from it; SIGKILLed inside its 3rd save (task 2, step 16) before the commit.
  cmd, env = cli(w, tiny_mnist_dir, every, env={"KILL_AT_COMMIT": "3"}, wrapper=KILL_IN_SAVE)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert "resuming from" in proc.stdout and "(task 1, epoch 2, step 16)" in proc.stdout
  assert steps_on_disk(w) == ["3", "4", "5.orbax-checkpoint-tmp"]   # 5: written, not committed
  # 3. Resumes from 4 (task 2 start); paused after training task 2, before its Fisher pass.
  run_until_hang(w, tiny_mnist_dir, "1:2:0", every)
  # 4. Resumes there: evaluation + Fisher of task 2, then task 3, to the end.
  proc = run_ok(w, tiny_mnist_dir, every)
  assert "(task 2 trained, evaluation and consolidation next)" in proc.stdout
  assert numbers(w) == numbers(reference)
  meta_a, arrays_a = final_state(w)
  meta_b, arrays_b = final_state(reference)
  assert meta_a["curves"] == meta_b["curves"] and meta_a["acc"] == meta_b["acc"]
  assert arrays_a.keys() == arrays_b.keys() and len(arrays_a) > 10
  for key, value in arrays_a.items():
    np.testing.assert_array_equal(value, arrays_b[key], err_msg=key)


def test_killed_without_chunk_checkpoints_resumes_from_the_last_task(reference, tiny_mnist_dir,
                                                                      tmp_path):
  """Default --checkpoint_every=0: killed mid-task, the task is redone from its start."""
  w = tmp_path / "run"
  run_until_hang(w, tiny_mnist_dir, "1:1:16")
  assert steps_on_disk(w) == ["0"]
  proc = run_ok(w, tiny_mnist_dir)
  assert "(task 2, epoch 1, step 0)" in proc.stdout
  assert numbers(w) == numbers(reference)
  # Re-running the finished command again reproduces the results from the last checkpoint.
  proc = run_ok(w, tiny_mnist_dir)
  assert "(all tasks done)" in proc.stdout and numbers(w) == numbers(reference)


def test_checkpoint_errors_are_one_line_exit_2_and_force_restart_recovers(
    reference, tiny_mnist_dir, tmp_path):
  """Another config, --noresume, truncated checkpoints (all of them: a corrupt newest one alone
  falls back on the previous one, tests/test_faults.py): refused; then --force_restart. All four
  command lines run in one process (tests/cli_batch.py)."""
  a, b = tmp_path / "a", tmp_path / "b"
  shutil.copytree(reference, a)
  shutil.copytree(reference, b)
  before = (a / "results.json").read_bytes()
  steps = [b / "checkpoints" / "seed_0" / s for s in steps_on_disk(b)]
  newest = steps[-1]
  for step in steps:  # truncate every array file of every checkpoint (none to fall back on)
    for path in (step / "state" / "d").iterdir():
      path.write_bytes(path.read_bytes()[:10])
  common = [*PROTOCOL, f"--data_dir={tiny_mnist_dir}"]
  jobs = [[*common, f"--workdir={a}", "--lam=10", "--fisher=true"],
          [*common, f"--workdir={a}", "--noresume"],
          [*common, f"--workdir={b}"],
          [*common, f"--workdir={b}", "--force_restart"]]
  mismatch, noresume, corrupt, restart = cli_batch.run_batch(jobs, tmp_path)
  lines = []
  for res in (mismatch, noresume, corrupt):
    errors = [l for l in res["stderr"].splitlines() if l.startswith("error: ")]
    assert res["code"] == 2 and len(errors) == 1, res
    assert "Traceback" not in res["stderr"] and "--force_restart" in errors[0], res
    lines.append(errors[0])
  from experiments import defaults  # pylint: disable=import-outside-toplevel
  default_lam = defaults.DEFAULTS[("split_mnist", "task")]["lam"]
  assert f"lam (checkpoint: {default_lam!r}, now: 10.0)" in lines[0]
  assert "fisher (checkpoint: 'empirical', now: 'true')" in lines[0]
  assert str(a / "checkpoints" / "seed_0") in lines[0] and "--noresume" in lines[1]
  assert str(newest) in lines[2] and "corrupt or truncated" in lines[2]
  assert (a / "results.json").read_bytes() == before          # nothing written by the failures
  # --force_restart discarded them and ran from scratch: the same numbers.
  assert restart["code"] == 0 and "discarded the checkpoints" in restart["stdout"], restart
  assert numbers(b) == numbers(reference)
