"""Fault campaign of the command lines, as an operator would try them: counts of trials, passes,
silent results, tracebacks and hangs (issue 24). On demand, not part of the test suite.

    python -m benchmarks.fault_campaign [--data_dir=DIR] [--seed=0] [--trials=60] [--out=f.json]

Trials (random moments drawn from ``--seed``; the default data: the real MNIST beside the
checkout, else a tiny one written for the campaign):

* ``kill``: SIGKILL at a random moment (imports, compile, training, inside a save), single runs
  (some checkpointing every chunk) and sweeps; then the same command again.
* ``kill_in_save``: SIGKILL just before a random checkpoint's commit (orbax's rename); rerun.
* ``sigterm`` / ``sigint``: the signal at a random moment; exit 143 / 130 with one line (or 0
  when it came after the end); then the same command again.
* ``corrupt``: a finished run's newest (or every) checkpoint damaged: one random file of any
  kind (metadata, array data, manifests...) truncated, filled with garbage, deleted, a bit
  flipped anywhere, or a bit flipped that orbax alone restores silently; or a record file of the dataset truncated / a bit flipped; rerun.
* ``readonly`` (root only: a read-only bind mount of ``<workdir>/checkpoints`` once the first
  checkpoint exists) and ``full_disk`` (files limited to 4 KiB after start-up): exit 2 with one
  line, within seconds; then the same command again, writable.
* ``failed_save_thread``: the second save fails with an OSError and leaves a non-daemon thread
  waiting forever (orbax's signalling threads did): the process must end anyway (20 repeats).
* ``bad_flags``: 150 bad command lines (each invalid value of every flag, conflicts, empty
  values, stray arguments, bad folders, pairs of bad values), run in one process: status 2 (3
  for a diverging ``--lr=1e30``), one ``error:`` line, nothing written (the workdir not even
  created), no lock file.

A trial passes when every process ended in time with an allowed status, its stderr holding only
``error:`` / ``warning:`` / ``interrupted`` lines (no library log noise), and, after a status 0,
results.json holds the uninterrupted reference's numbers bit for bit; after a refusal, exactly
one ``error:`` line and no traceback. It is *silent* when a run exits 0 with numbers other than
the reference's (or exits 0 on damaged input that could not have been read correctly), a
*traceback* when one reaches stderr, a *hang* when a process outlives its timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROTOCOL = ("--num_tasks=3", "--max_examples=400", "--batch_size=16", "--hidden=64",
            "--chunk_steps=16", "--epochs=2", "--noprogress", "--noplots")
TIMEOUT = 180

KILL_IN_SAVE = r"""
import os, runpy, signal, sys
import orbax.checkpoint._src.path.async_path as ap
orig, count = ap.rename, [0]
async def rename(src, dst, *a, **k):
  if "orbax-checkpoint-tmp" not in str(dst):
    count[0] += 1
    if count[0] == int(os.environ["KILL_AT_COMMIT"]):
      os.kill(os.getpid(), signal.SIGKILL)
  return await orig(src, dst, *a, **k)
ap.rename = rename
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_module("experiments." + sys.argv[0], run_name="__main__")
"""

FULL_DISK = r"""
import resource, runpy, signal, sys, threading
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
def limit():
  resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
threading.Timer(float(sys.argv[1]), limit).start()
sys.argv = [sys.argv[2]] + sys.argv[3:]
runpy.run_module("experiments." + sys.argv[0], run_name="__main__")
"""

FAILED_SAVE_THREAD = r"""
import errno, os, runpy, sys, threading
import orbax.checkpoint._src.metadata.checkpoint as mc
orig = mc._MetadataStoreImpl.write
def write(self, file_path, metadata):
  if os.path.basename(os.path.dirname(str(file_path))).startswith("1.orbax-checkpoint-tmp"):
    threading.Thread(target=threading.Event().wait, daemon=False).start()
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file_path))
  return orig(self, file_path, metadata)
mc._MetadataStoreImpl.write = write
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_module("experiments." + sys.argv[0], run_name="__main__")
"""


class Outcome:
  PASS, SILENT, TRACEBACK, HANG, FAIL = "pass", "silent", "traceback", "hang", "fail"


def env() -> dict:
  return {**os.environ, "PYTHONPATH": str(ROOT)}


def command(module: str, workdir: Path, data_dir: str, extra=(), wrapper: str | None = None,
            wrapper_args=()) -> list[str]:
  flags = [*PROTOCOL, f"--data_dir={data_dir}", f"--workdir={workdir}", *extra]
  if wrapper is None:
    return [sys.executable, "-m", f"experiments.{module}", *flags]
  return [sys.executable, "-c", wrapper, *map(str, wrapper_args), module, *flags]


def run(cmd, timeout=TIMEOUT, extra_env=None, cwd=ROOT):
  """``(returncode or "hang", stdout, stderr)``."""
  try:
    p = subprocess.run(cmd, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr
  except subprocess.TimeoutExpired as err:
    out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    errs = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
    return "hang", out, errs


def signal_at(cmd, delay: float, sig: int, timeout=TIMEOUT):
  """Starts ``cmd``, sends ``sig`` after ``delay`` s: ``(returncode or "hang", stderr)``."""
  p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  time.sleep(delay)
  if p.poll() is None:
    p.send_signal(sig)
  try:
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err
  except subprocess.TimeoutExpired:
    p.kill()
    _, err = p.communicate()
    return "hang", err


def numbers(workdir: Path):
  """results.json without timings, provenance and the settings that differ between runs."""
  res = json.loads((workdir / "results.json").read_text(), parse_constant=float)
  for key in ("timings", "environment", "experiment"):
    res.pop(key, None)
  for r in res.get("runs", []):
    r.pop("timings", None)
    r.pop("resumed_from", None)
  return json.dumps(res, sort_keys=True)


def errors_of(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error: ")]


def judge_end(code, stderr: str, allowed: tuple, workdir: Path | None = None,
              reference: str | None = None) -> tuple[str, str]:
  """One process's end: ``(outcome, why)``."""
  if code == "hang":
    return Outcome.HANG, "outlived its timeout"
  if "Traceback" in stderr:
    return Outcome.TRACEBACK, stderr[-1500:]
  if code not in allowed:
    return Outcome.FAIL, f"status {code}: {stderr[-800:]}"
  noise = [line for line in stderr.splitlines() if line.strip() and not line.startswith(
      ("error: ", "warning: ", "interrupted ("))]
  if noise:
    return Outcome.FAIL, f"status {code} with other lines on stderr: {noise[:3]}"
  if code == 0:
    if errors_of(stderr):
      return Outcome.FAIL, f"status 0 with an error line: {stderr[-800:]}"
    if reference is not None and workdir is not None:
      if not (workdir / "results.json").exists():
        return Outcome.FAIL, "status 0 without results.json"
      if numbers(workdir) != reference:
        return Outcome.SILENT, "status 0 with numbers other than the reference's"
  elif code in (2, 3) and len(errors_of(stderr)) != 1:
    return Outcome.FAIL, f"status {code} without exactly one error line: {stderr[-800:]}"
  elif code in (130, 143):
    lines = [line for line in stderr.splitlines() if line.strip()]
    if len(lines) != 1 or not lines[0].startswith("interrupted ("):
      return Outcome.FAIL, f"status {code} without one interrupted line: {stderr[-800:]}"
  return Outcome.PASS, ""


def finish_and_compare(module, workdir, data_dir, extra, reference) -> tuple[str, str]:
  """The same command again (resume): status 0 and the reference's numbers."""
  code, _, err = run(command(module, workdir, data_dir, extra))
  return judge_end(code, err, (0,), workdir, reference)


class Campaign:
  def __init__(self, data_dir: str, folder: Path, rng: random.Random):
    self.data_dir, self.folder, self.rng = data_dir, folder, rng
    self.trials: list[dict] = []
    self.refs: dict = {}
    self.n = 0

  def workdir(self, kind: str) -> Path:
    self.n += 1
    return self.folder / f"{self.n:03d}_{kind}"

  def record(self, kind: str, detail: str, outcome: str, why: str = "") -> None:
    self.trials.append({"kind": kind, "detail": detail, "outcome": outcome, "why": why})
    print(f"[{len(self.trials):3d}] {outcome:9s} {kind:18s} {detail}" +
          (f"  -- {why[:300]}" if why else ""), flush=True)

  def reference(self, module: str, extra: tuple) -> tuple[str, float]:
    """The uninterrupted run's numbers and wall time (of a second run: the compiled programs
    cached, as for the trials; the signals are drawn within it)."""
    key = (module, extra)
    if key not in self.refs:
      runs = []
      for _ in range(2):
        w = self.workdir("reference")
        t0 = time.monotonic()
        code, _, err = run(command(module, w, self.data_dir, extra))
        assert code == 0, f"the reference run failed: {err[-3000:]}"
        runs.append((numbers(w), time.monotonic() - t0))
      assert runs[0][0] == runs[1][0], "two uninterrupted runs differ"
      self.refs[key] = runs[1]
    return self.refs[key]

  def setups(self):
    return [("split_mnist", ()), ("split_mnist", ("--checkpoint_every=16",)),
            ("sweep", ("--lam=1,100",))]

  # -- trial kinds
  def signal_trial(self, kind: str, sig: int, allowed: tuple) -> None:
    module, extra = self.rng.choice(self.setups())
    reference, seconds = self.reference(module, extra)
    delay = self.rng.uniform(0.2, seconds)
    w = self.workdir(kind)
    code, err = signal_at(command(module, w, self.data_dir, extra), delay, sig)
    detail = f"{module} {' '.join(extra)} at {delay:.2f} s -> {code}"
    outcome, why = judge_end(code, err, allowed, w, reference if code == 0 else None)
    if outcome == Outcome.PASS and code != 0:
      if (w / ".lock").exists() and code != -signal.SIGKILL:
        outcome, why = Outcome.FAIL, "lock file left behind"
      else:
        outcome, why = finish_and_compare(module, w, self.data_dir, extra, reference)
    self.record(kind, detail, outcome, why)

  def kill_in_save(self) -> None:
    module, extra = self.rng.choice(self.setups())
    reference, _ = self.reference(module, extra)
    commits = {"split_mnist": 3, "sweep": 3}[module] + (8 if extra and "every" in extra[0] else 0)
    at = self.rng.randint(1, commits)
    w = self.workdir("kill_in_save")
    code, _, err = run(command(module, w, self.data_dir, extra, KILL_IN_SAVE),
                       extra_env={"KILL_AT_COMMIT": str(at)})
    outcome, why = judge_end(code, err, (-signal.SIGKILL, 0), w, reference if code == 0 else None)
    if outcome == Outcome.PASS:
      outcome, why = finish_and_compare(module, w, self.data_dir, extra, reference)
    self.record("kill_in_save", f"{module} {' '.join(extra)} commit {at} -> {code}", outcome, why)

  def corrupt_checkpoint(self) -> None:
    import corrupt  # pylint: disable=import-outside-toplevel
    extra = ("--checkpoint_every=16", "--keep=3")
    reference, _ = self.reference("split_mnist", ("--checkpoint_every=16",))
    w = self.workdir("corrupt")
    code, _, err = run(command("split_mnist", w, self.data_dir, extra))
    assert code == 0, err[-2000:]
    folder = w / "checkpoints" / "seed_0"
    steps = sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    every = self.rng.random() < 0.25
    targets = steps if every else steps[-1:]
    how = self.rng.choice(["truncate", "garbage", "delete", "flip_array", "flip_any"])
    what = []
    for step in targets:
      files = sorted(p for p in step.rglob("*") if p.is_file())
      if how == "flip_array":  # a bit orbax restores silently, with other values
        what.append(f"{step.name}: {corrupt.silent_bit_flip(step, self.rng.randrange(10**6))}")
        continue
      path = self.rng.choice(files)
      data = bytearray(path.read_bytes())
      if how == "truncate":
        path.write_bytes(bytes(data[:self.rng.randrange(max(len(data), 1))]))
      elif how == "garbage":
        path.write_bytes(os.urandom(max(len(data), 16)))
      elif how == "delete":
        path.unlink()
      elif data:
        i = self.rng.randrange(len(data))
        data[i] ^= 1 << self.rng.randrange(8)
        path.write_bytes(bytes(data))
      what.append(f"{path.relative_to(folder)}")
    (w / "results.json").unlink()
    code, _, err = run(command("split_mnist", w, self.data_dir, extra))
    fell_back = " (fell back: warning)" if "warning: " in err else ""
    detail = (f"{how} {'every checkpoint' if every else 'newest'}: {', '.join(what)[:200]} -> "
              f"{code}{fell_back}")
    outcome, why = judge_end(code, err, (0, 2), w, reference if code == 0 else None)
    if outcome == Outcome.PASS and code == 2 and (w / "results.json").exists():
      outcome, why = Outcome.FAIL, "refused but results.json written"
    if outcome == Outcome.PASS and code == 0 and every and how == "flip_array":
      outcome, why = Outcome.SILENT, "every checkpoint had a flipped array bit, yet status 0"
    self.record("corrupt", detail, outcome, why)

  def corrupt_data(self) -> None:
    reference, _ = self.reference("split_mnist", ())
    data_copy = self.workdir("data")
    shutil.copytree(self.data_dir, data_copy, ignore=shutil.ignore_patterns("downloads"))
    records = sorted(data_copy.rglob("*.array_record*"))
    path = self.rng.choice(records)
    data = bytearray(path.read_bytes())
    how = self.rng.choice(["truncate", "flip", "garbage"])
    if how == "truncate":
      data = data[:self.rng.randrange(len(data))]
    elif how == "flip":
      i = self.rng.randrange(len(data))
      data[i] ^= 1 << self.rng.randrange(8)
    else:
      i = self.rng.randrange(len(data))
      data[i:i + 64] = os.urandom(64)
    path.write_bytes(bytes(data))
    w = self.workdir("corrupt_data")
    code, _, err = run(command("split_mnist", w, str(data_copy), ("--nocompile_cache",)),
                       extra_env={"EWC_JAX_CACHE_DIR": str(self.folder / f"cache_{self.n}")})
    outcome, why = judge_end(code, err, (0, 2), w, reference if code == 0 else None)
    self.record("corrupt_data", f"{how} {path.name} -> {code}", outcome, why)
    shutil.rmtree(data_copy, ignore_errors=True)

  def readonly(self) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
      return
    reference, _ = self.reference("split_mnist", ("--checkpoint_every=16",))
    extra = ("--checkpoint_every=16",)
    w = self.workdir("readonly")
    p = subprocess.Popen(command("split_mnist", w, self.data_dir, extra), cwd=ROOT, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck = w / "checkpoints"
    deadline = time.monotonic() + TIMEOUT
    while not (ck / "seed_0" / "0").is_dir() and p.poll() is None and time.monotonic() < deadline:
      time.sleep(0.02)
    time.sleep(self.rng.uniform(0, 0.5))
    mounted = p.poll() is None and subprocess.run(
        ["mount", "--bind", str(ck), str(ck)], capture_output=True).returncode == 0
    if mounted:
      subprocess.run(["mount", "-o", "remount,ro,bind", str(ck)], capture_output=True)
    try:
      _, err = p.communicate(timeout=TIMEOUT)
      code = p.returncode
    except subprocess.TimeoutExpired:
      p.kill()
      _, err = p.communicate()
      code = "hang"
    finally:
      if mounted:
        subprocess.run(["umount", str(ck)], capture_output=True)
    outcome, why = judge_end(code, err, (0, 2), w, reference if code == 0 else None)
    if outcome == Outcome.PASS and (w / ".lock").exists():
      outcome, why = Outcome.FAIL, "lock file left behind"
    if outcome == Outcome.PASS:
      outcome, why = finish_and_compare("split_mnist", w, self.data_dir, extra, reference)
    self.record("readonly", f"mounted={mounted} -> {code}", outcome, why)

  def full_disk(self) -> None:
    module, extra = self.rng.choice(self.setups())
    reference, seconds = self.reference(module, extra)
    after = self.rng.uniform(0.5, seconds)
    w = self.workdir("full_disk")
    code, _, err = run(command(module, w, self.data_dir, extra, FULL_DISK, (after,)))
    outcome, why = judge_end(code, err, (0, 2), w, reference if code == 0 else None)
    if outcome == Outcome.PASS and code == 2 and (w / ".lock").exists():
      outcome, why = Outcome.FAIL, "lock file left behind"
    if outcome == Outcome.PASS:
      outcome, why = finish_and_compare(module, w, self.data_dir, extra, reference)
    self.record("full_disk", f"{module} {' '.join(extra)} limit at {after:.2f} s -> {code}",
                outcome, why)

  def failed_save_thread(self) -> None:
    w = self.workdir("failed_save")
    t0 = time.monotonic()
    code, _, err = run(command("split_mnist", w, self.data_dir, (), FAILED_SAVE_THREAD), timeout=90)
    outcome, why = judge_end(code, err, (2,))
    if outcome == Outcome.PASS and ("Read-only file system" not in err or (w / ".lock").exists()):
      outcome, why = Outcome.FAIL, err[-800:]
    self.record("failed_save_thread", f"-> {code} in {time.monotonic() - t0:.1f} s", outcome, why)

  def bad_flags(self) -> None:
    import cli_batch  # pylint: disable=import-outside-toplevel
    import test_fuzz_cli  # pylint: disable=import-outside-toplevel
    jobs = []
    base = ["--num_tasks=2", "--max_examples=32", "--batch_size=16", "--hidden=8", "--noplots",
            "--noprogress", f"--data_dir={self.data_dir}"]
    valid_anyway = {"--seed=-1", "--seed=1099511627776"}  # the fuzz pools' values a run takes
    for name, (_, invalid) in test_fuzz_cli.POOLS.items():
      for value in invalid:
        if f"--{name}={value}" not in valid_anyway:
          jobs.append([*base, f"--{name}={value}"])
    jobs += [[*base, *extra] for extra in (
        ["--classes_per_task=0"], ["--classes_per_task=-1"], ["--classes_per_task=11"],
        ["--seed=1", "--seeds=2,3"], ["--dataset="], ["--seeds="], ["--hidden="], ["--lam="],
        ["stray"], ["--lam=1", "extra", "words"], ["--workdir="], ["--validation_fraction=0.9999"],
        ["--max_examples=1"], ["--data_dir="], ["--data_dir=/nonexistent/folder"],
        [f"--data_dir={__file__}"], ["--workdir=/proc/forbidden"], ["--epochs=1", "--steps_per_task=5"],
        ["--input_norm=bogus"], ["--benchmark=split_mnist"], ["--keep=x"], ["--manual_dir="],
        ["--scenario=domain", "--classes_per_task=0"], ["--p=inf"], ["--lr=-0"],
        ["--chunk_steps=1e3"], ["--batch_size=1.5"], ["--nolam"], ["--seeds=1,x"],
        ["--width=8"], ["--backbone=bogus"], ["--augment=crop_flip", "--backbone=mlp", "--lam=0"],
        ["--init=bogus"], ["--optimizer=bogus"], ["--consolidate=bogus"], ["--gamma=2"])]
    rng = random.Random(self.rng.random())
    pools = [(n, [v for v in inv if f"--{n}={v}" not in valid_anyway])
             for n, (_, inv) in test_fuzz_cli.POOLS.items() if n != "seed" and inv]
    while len(jobs) < 150:  # two invalid values at once
      (a, ia), (b, ib) = rng.sample(pools, 2)
      jobs.append([*base, f"--{a}={rng.choice(ia)}", f"--{b}={rng.choice(ib)}"])
    folder = self.workdir("bad_flags")
    folder.mkdir()
    full = []
    for i, job in enumerate(jobs):
      w = folder / f"w{i}" / "run"
      full.append(job if any(a.startswith("--workdir") for a in job) else [*job, f"--workdir={w}"])
    results = cli_batch.run_batch(full, folder)
    for i, (job, res) in enumerate(zip(full, results)):
      code = res["code"]
      outcome, why = (Outcome.TRACEBACK, res["stderr"][-800:]) if code == "uncaught" else \
          judge_end(code, res["stderr"], (2, 3))  # 3: a huge --lr diverges (one line too)
      if outcome == Outcome.PASS and (folder / f"w{i}").exists():
        outcome, why = Outcome.FAIL, "the workdir was created"
      self.record("bad_flags", " ".join(job[len(base):]), outcome, why)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  shared = ROOT.parent / "shared" / "tensorflow_datasets"
  parser.add_argument("--data_dir", default=str(shared) if (shared / "mnist").is_dir() else None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--trials", type=int, default=60, help="process trials (besides the "
                      "20 failed-save repeats and the bad flags)")
  parser.add_argument("--failed_save_repeats", type=int, default=20)
  parser.add_argument("--out", default=None, help="write the trials and counts as JSON here")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  folder = Path(tempfile.mkdtemp(prefix="fault_campaign_"))
  os.environ.setdefault("EWC_JAX_CACHE_DIR", str(folder / "cache"))
  data_dir = args.data_dir
  if data_dir is None:
    import tiny_tfds  # pylint: disable=import-outside-toplevel
    data_dir = str(folder / "tiny")
    tiny_tfds.write_dataset(Path(data_dir), "mnist", {"train": 2000, "test": 500}, seed=0,
                            learnable=True)
  c = Campaign(data_dir, folder / "runs", rng)
  (folder / "runs").mkdir()
  t0 = time.monotonic()
  kinds = [("kill", lambda: c.signal_trial("kill", signal.SIGKILL, (-signal.SIGKILL, 0))),
           ("sigterm", lambda: c.signal_trial("sigterm", signal.SIGTERM, (143, 0))),
           ("sigint", lambda: c.signal_trial("sigint", signal.SIGINT, (130, 0))),
           ("kill_in_save", c.kill_in_save), ("corrupt", c.corrupt_checkpoint),
           ("corrupt_data", c.corrupt_data), ("readonly", c.readonly),
           ("full_disk", c.full_disk)]
  weights = [5, 3, 3, 3, 6, 2, 2, 2]
  for _ in range(args.trials):
    rng.choices(kinds, weights)[0][1]()
  for _ in range(args.failed_save_repeats):
    c.failed_save_thread()
  c.bad_flags()
  counts = {"trials": len(c.trials)}
  for outcome in (Outcome.PASS, Outcome.SILENT, Outcome.TRACEBACK, Outcome.HANG, Outcome.FAIL):
    counts[outcome] = sum(t["outcome"] == outcome for t in c.trials)
  by_kind: dict = {}
  for t in c.trials:
    by_kind.setdefault(t["kind"], {}).setdefault(t["outcome"], 0)
    by_kind[t["kind"]][t["outcome"]] += 1
  summary = {"counts": counts, "by_kind": by_kind, "seed": args.seed, "data_dir": data_dir,
             "seconds": time.monotonic() - t0, "trials": c.trials}
  print(json.dumps({k: summary[k] for k in ("counts", "by_kind", "seconds")}, indent=1))
  if args.out:
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
  shutil.rmtree(folder, ignore_errors=True)
  sys.exit(0 if counts[Outcome.PASS] == counts["trials"] else 1)


if __name__ == "__main__":
  main()
