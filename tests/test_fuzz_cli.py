"""Fuzz: 200 random flag combinations of the Split MNIST command line, zero uncaught exceptions.

Every command line either succeeds (status 0), is refused with status 2 and one ``error:`` line,
or diverges with status 3 and one ``error:`` line (e.g. a huge --lr). The combinations come from
a fixed PRNG seed (the same 200 every time); most flags draw a valid value, sometimes an invalid
one, so both the error paths and real (tiny) runs are exercised; three work folders are shared,
so refusals of another configuration's checkpoints happen too. All run in one process
(tests/cli_batch.py), < 60 s.
"""

import random
from pathlib import Path

import pytest

import cli_batch

ROOT = Path(__file__).resolve().parents[1]
N = 200

# flag -> (valid values, invalid values). Valid values that change the compiled programs are
# biased towards one value, so most real runs reuse compiled programs (the persistent cache).
POOLS = {
    "algo": (["ewc"] * 4 + ["online_ewc", "l2", "finetune", "ewc_merged", "joint"],
             ["bogus", ""]),
    "scenario": (["task"] * 4 + ["domain", "class"], ["bogus"]),
    "penalty": (["standard"] * 4 + ["seed", "clarena"], ["weird"]),
    "lam": (["1", "1000", "1e-3"], ["0", "-1", "nan", "inf", "x"]),
    "p": (["2"] * 4 + ["1.5"], ["0", "-1", "nan"]),
    "gamma": (["1", "0.5"], ["0", "1.5", "nan", "-inf"]),
    "fisher": (["empirical"] * 4 + ["true", "sampled", "predicted", "batch_squared"], ["exact"]),
    "fisher_batch_size": (["64"] * 3 + ["16"], ["0", "-3"]),
    "fisher_normalize": (["false"] * 3 + ["true"], ["maybe"]),
    "epochs": (["1"] * 3 + ["2"], ["0", "-1", "abc"]),
    "batch_size": (["16"] * 3 + ["8"], ["0", "-5", "100000", "x"]),
    "lr": (["1e-3", "1e-2"], ["0", "-1", "nan", "1e30"]),
    "hidden": (["8"] * 4 + ["8,4"], ["0", "a", "", "-3"]),
    "seed": (["0", "1", "7"], ["-1", "1099511627776", "x"]),
    "seeds": (["0,1"], ["1,1", "a", "0,,1"]),
    "dataset": (["mnist"], ["bogus_dataset_xyz", "", "mnist:99.0.0"]),
    "num_tasks": (["2"] * 3 + ["1"], ["0", "9", "-1", "two"]),
    "max_examples": (["32"] * 3 + ["48"], ["0", "-2"]),
    "checkpoint_every": (["0", "16"], ["-1"]),
    "chunk_steps": (["64"] * 3 + ["5"], ["0", "-2", "x"]),
    "keep": (["1", "2"], ["0", "-4"]),
    "checkpoint": (["true"] * 3 + ["false"], []),
    "resume": (["true", "false"], []),
    "force_restart": (["true", "false"], []),
    "plots": (["false"] * 9 + ["true"], []),
    "progress": (["false"] * 9 + ["true"], []),
}
ALWAYS = {"hidden": "8", "max_examples": "32", "num_tasks": "2", "epochs": "1",
          "batch_size": "16", "plots": "false", "progress": "false"}
P_FLAG, P_INVALID = 0.35, 0.15
P_RARE = {"seeds": 0.1, "plots": 0.1, "progress": 0.1}  # slower when valid: fewer
VALID_EVERY = 25  # 8 of the 200 draw valid values only


def combinations(data_dir: str, workdirs: list, seed: int = 0, n: int = N) -> list:
  """``n`` argument lists. Every ``VALID_EVERY``-th draws valid values only (a real run, unless
  its shared work folder holds another configuration's checkpoints); the others hold at least one
  invalid value among random valid ones (an error path), which bounds the time."""
  rng = random.Random(seed)
  jobs = []
  for i in range(n):
    valid_only = i % VALID_EVERY == 0
    flags, bad_flags = dict(ALWAYS), []
    for name, (valid, invalid) in POOLS.items():
      if rng.random() < P_RARE.get(name, P_FLAG):
        bad = not valid_only and invalid and rng.random() < P_INVALID
        flags[name] = rng.choice(invalid if bad else valid)
        bad_flags += [name] if bad else []
    argv = [f"--{k}={v}" for k, v in flags.items()]
    r = 0.0 if valid_only else rng.random()
    argv.append(f"--data_dir={data_dir}" if r < 0.9 else
                f"--data_dir={workdirs[0]}/missing" if r < 0.95 else f"--data_dir={__file__}")
    r = 0.0 if valid_only else rng.random()
    shared = rng.choice(workdirs) if not valid_only or rng.random() < 0.5 else f"{workdirs[0]}_{i}"
    argv.append(f"--workdir={shared}" if r < 0.95 else
                f"--workdir={__file__}/sub")  # a file's child: not writable
    if not valid_only and rng.random() < 0.03:
      argv.append(rng.choice(["--bogus_flag=1", "--nolam", "positional"]))
    elif not valid_only and not bad_flags and r < 0.95 and "missing" not in argv[-2]:
      name = rng.choice([k for k, (_, invalid) in POOLS.items() if invalid])
      argv = [a for a in argv if not a.startswith(f"--{name}=")]
      argv.insert(0, f"--{name}={rng.choice(POOLS[name][1])}")
    jobs.append(argv)
  return jobs


@pytest.mark.extended
def test_fuzz_200_flag_combinations(tiny_mnist_dir, tmp_path):
  workdirs = [str(tmp_path / f"w{i}") for i in range(3)]
  jobs = combinations(tiny_mnist_dir, workdirs)
  results = cli_batch.run_batch(jobs, tmp_path)
  assert len(results) == N
  problems = []
  for r in results:
    errors = [l for l in r["stderr"].splitlines() if l.startswith("error: ")]
    if r["code"] == 0:
      ok = not errors and "Traceback" not in r["stderr"]
    else:
      ok = r["code"] in (2, 3) and len(errors) == 1 and "Traceback" not in r["stderr"]
    if not ok:
      problems.append(f"{r['argv']} -> {r['code']}: {r['stderr'][-1500:]}")
  assert not problems, "\n\n".join(problems[:5])
  codes = [r["code"] for r in results]
  # Both sides are exercised: real runs and refusals (resume itself: tests/test_resume_cli.py).
  assert codes.count(0) >= 4 and codes.count(2) >= 150, codes
