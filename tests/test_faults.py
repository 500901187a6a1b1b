"""Fault tests of the command line, each with real subprocesses and real signals / OS faults.

* Two runs on one workdir: the second exits 2 at once naming the holder's pid; after the holder
  is SIGKILLed its stale lock file never blocks.
* SIGINT and SIGTERM mid-epoch: the run saves that position, prints one line, exits 130 / 143;
  resuming from it is bit-identical. A second signal exits at once, saving nothing more.
* A save that fails (the file-size limit of the process, as on a full disk): one error line,
  exit 2, the last complete checkpoint intact and resumable.

Positions are reached deterministically through the test-only EWC_JAX_TEST_HANG_AT pause
(tests/hooks/sitecustomize.py, see tests/test_resume_cli.py); the same tiny protocol (3 tasks of
400 examples of the session's tiny MNIST, batch 16, chunks of 16 steps, 2 epochs, MLP 784-64).
"""

import os
import signal
import subprocess
import time

import pytest

import pause

from tests.test_resume_cli import ROOT, cli, numbers, run_ok, steps_on_disk


# Runs the CLI with files limited to 4 KiB (RLIMIT_FSIZE; SIGXFSZ ignored: writes past the
# limit fail with EFBIG, as on a full disk). Set in the child itself: no fork-time callback.
LIMIT_FILE_SIZE = r"""
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
sys.argv = ["split_mnist"] + sys.argv[1:]
runpy.run_module("experiments.split_mnist", run_name="__main__")
"""


@pytest.fixture(scope="module")
def reference(tiny_mnist_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("faults_reference") / "run"
  run_ok(workdir, tiny_mnist_dir)
  return workdir


def start_paused(workdir, data_dir, at, *extra):
  """Starts the CLI and waits until it pauses at ``at`` ("task:epoch:step"); returns the
  process (still running, holding the workdir's lock)."""
  marker = pause.marker_path(workdir, at)
  cmd, env = cli(workdir, data_dir, *extra, env=pause.pause_env(at, marker))
  return pause.start_paused(cmd, env, at, marker)


def run_cmd(workdir, data_dir, *extra, **kw):
  cmd, env = cli(workdir, data_dir, *extra)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                        **kw)


def error_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith("error: ")]


def test_second_run_on_a_locked_workdir_exits_2_at_once_and_a_stale_lock_never_blocks(
    reference, tiny_mnist_dir, tmp_path):
  w = tmp_path / "run"
  holder = start_paused(w, tiny_mnist_dir, "1:0:16")
  try:
    t0 = time.monotonic()
    # Other flags (another config) and the same flags: both refused before touching anything.
    for extra in (["--lam=10"], []):
      second = run_cmd(w, tiny_mnist_dir, *extra)
      assert second.returncode == 2, second.stderr[-3000:]
      (line,) = error_lines(second.stderr)
      assert "Traceback" not in second.stderr
      assert f"--workdir='{w}'" in line and f"pid {holder.pid}" in line, line
    assert time.monotonic() - t0 < 60  # no waiting on the holder (seconds: imports only)
    assert steps_on_disk(w) == ["0"] and holder.poll() is None
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=60)
  assert (w / ".lock").read_text().strip() == str(holder.pid)  # the stale lock file stays ...
  proc = run_ok(w, tiny_mnist_dir)                              # ... and does not block
  assert "(task 2, epoch 1, step 0)" in proc.stdout
  assert numbers(w) == numbers(reference)


@pytest.mark.parametrize("sig,at,where,code", [
    (signal.SIGINT, "0:1:16", "task 1, epoch 2, step 16", 130),
    (signal.SIGTERM, "1:0:16", "task 2, epoch 1, step 16", 143)])
def test_sigint_and_sigterm_save_the_position_and_resume_bit_identical(
    reference, tiny_mnist_dir, tmp_path, sig, at, where, code):
  w = tmp_path / "run"
  before = steps_on_disk(w) if (w / "checkpoints").exists() else []
  proc = start_paused(w, tiny_mnist_dir, at)   # default --checkpoint_every=0: no chunk saves
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == code, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
  last = err.strip().splitlines()[-1]
  assert last == (f"interrupted ({signal.Signals(sig).name}) at {where}; saved; run the same "
                  "command to resume"), err
  assert len(steps_on_disk(w)) == len(before) + (2 if at.startswith("1:") else 1)
  proc = run_ok(w, tiny_mnist_dir)
  assert f"({where})" in proc.stdout  # resumed from the interrupt's checkpoint
  assert numbers(w) == numbers(reference)
  assert not (w / "results.json.tmp").exists()


def test_a_second_signal_exits_at_once_without_saving(tiny_mnist_dir, tmp_path):
  """SIGINT then SIGTERM delivered together (the process stopped meanwhile, so both are pending
  when it continues): the second ends the process at once, nothing more is written."""
  w = tmp_path / "run"
  proc = start_paused(w, tiny_mnist_dir, "1:0:16")
  assert steps_on_disk(w) == ["0"]
  proc.send_signal(signal.SIGSTOP)
  proc.send_signal(signal.SIGINT)
  proc.send_signal(signal.SIGTERM)
  proc.send_signal(signal.SIGCONT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143, err[-3000:]
  assert "interrupted again (SIGTERM): exiting now without saving" in err
  assert "; saved;" not in err and "Traceback" not in err
  assert steps_on_disk(w) == ["0"]  # nothing more saved; checkpoint 0 is complete
  proc = run_ok(w, tiny_mnist_dir)
  assert "(task 2, epoch 1, step 0)" in proc.stdout


def test_a_failed_save_is_one_line_and_keeps_the_last_checkpoint(reference, tiny_mnist_dir,
                                                                 tmp_path):
  """Checkpoint 0 (after task 1) is written, then the run is killed; it resumes under a file
  size limit of 4 KiB (as on a full disk: EFBIG), so the save after task 2 fails."""
  w = tmp_path / "run"
  holder = start_paused(w, tiny_mnist_dir, "1:0:16")
  holder.send_signal(signal.SIGKILL)
  holder.communicate(timeout=60)
  good = sorted(p.name for p in (w / "checkpoints" / "seed_0" / "0").rglob("*"))

  cmd, env = cli(w, tiny_mnist_dir, "--nocompile_cache", wrapper=LIMIT_FILE_SIZE)
  failed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert failed.returncode == 2, failed.stderr[-3000:]
  assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
  (line,) = error_lines(failed.stderr)
  assert line.startswith(f"error: could not save checkpoint {w / 'checkpoints' / 'seed_0' / '1'}")
  assert "File too large" in line
  assert f"the last complete checkpoint {w / 'checkpoints' / 'seed_0' / '0'} is kept" in line
  assert not (w / "results.json").exists()
  assert sorted(p.name for p in (w / "checkpoints" / "seed_0" / "0").rglob("*")) == good
  proc = run_ok(w, tiny_mnist_dir)  # the limit gone: resumes from checkpoint 0, same numbers
  assert "(task 2, epoch 1, step 0)" in proc.stdout
  assert numbers(w) == numbers(reference)


def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
  from experiments import lock  # pylint: disable=import-outside-toplevel
  with lock.hold(tmp_path):
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(lock.WorkdirLocked, match=f"pid {os.getpid()}") as err:
      with lock.hold(tmp_path):
        pass
    assert err.value.pid == os.getpid() and f"--workdir='{tmp_path}'" in str(err.value)
  with lock.hold(tmp_path):  # released at the end of the block
    pass
