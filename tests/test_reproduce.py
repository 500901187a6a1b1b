"""The reproduction, module by module: the papers' tables (λ translation, epoch conversion,
lookups), the JSON store (merge, earlier formats), the markdown (rendered from a small store; the
committed docs/results.md from docs/results.json, byte for byte), the command line's options and
errors, and tiny real-data runs that write the markdown (keeping hand-written text) and the store,
killed and resumed."""

import json
import os
import math
import subprocess
import sys
from pathlib import Path

import pytest

import pause

from ewc_jax import errors
from experiments import paper_tables as tables
from experiments import reproduce
from experiments import reproduce_runner as runner
from experiments import results_report as report
from experiments import results_store as store_lib

ROOT = Path(__file__).resolve().parents[1]


def test_lambda_translation():
  # Hsu et al.: λ Σ F (θ − θ*)², no ½ -> our lam = 2 λ; online EWC accumulates with γ = 1.
  assert tables.hyper_for(tables.HSU_SPLIT, "ewc", "class") == (600.0, 1.0, 1200.0, 1.0)
  assert tables.hyper_for(tables.HSU_SPLIT, "l2", "task")[2] == pytest.approx(0.02)
  # van de Ven & Tolias: ½ λ Σ F (θ − θ*)² as ours; online EWC applies γ again in the loss.
  assert tables.hyper_for(tables.VDV_SPLIT, "ewc", "domain") == (1e6, 1.0, 1e6, 1.0)
  _, gamma, lam, our_gamma = tables.hyper_for(tables.VDV_PERMUTED, "online_ewc", "domain")
  assert (gamma, our_gamma) == (0.9, 0.9) and lam == pytest.approx(900.0)
  assert tables.hyper_for(tables.HSU_SPLIT, "joint", "task")[:2] == (None, None)


def test_iterations_to_epochs():
  counts = [12665, 12089, 11263, 12183, 11800]               # Split MNIST train tasks
  assert tables.epochs_for(tables.VDV_SPLIT, "ewc", counts, None) == 21   # 2000*128/12k
  assert tables.epochs_for(tables.VDV_SPLIT, "joint", counts, None) == 4  # on all 60k
  assert tables.epochs_for(tables.VDV_PERMUTED, "ewc", [60000] * 10, None) == 11
  assert tables.epochs_for(tables.VDV_PERMUTED, "joint", [10000] * 10, 6) == 1
  assert tables.epochs_for(tables.HSU_SPLIT, "joint", counts, None) == 4


def test_table_lookups():
  assert tables.get_setup("vandeven", "permuted") is tables.VDV_PERMUTED
  assert tables.get_setup("hsu", "split") is tables.HSU_SPLIT
  with pytest.raises(errors.SettingError) as err:
    tables.get_setup("hsu", "permuted")
  assert err.value.for_flags() == ("--protocol='hsu' --benchmark='permuted' is invalid: expected "
                                   "one of hsu/split, vandeven/split, vandeven/permuted.")
  assert tables.HSU_SPLIT.published["l2"]["domain"] == (66.00, 3.73)
  assert tables.VDV_SPLIT.lam["online_ewc"]["class"] == (1e9, 0.8)
  for setup in tables.PROTOCOLS.values():  # every reported algorithm: a cell per scenario
    assert set(setup.published) == set(setup.algos)
    assert all(set(cells) == set(tables.SCENARIOS) for cells in setup.published.values())
    assert set(setup.lam) == set(setup.algos) - {"finetune", "joint"}
  assert tables.BENCHMARKS["permuted"].title == "Permuted MNIST"


def test_verdict_uses_std_from_sem():
  rec = {"mean": 60.0, "published": {"mean": 63.95, "err": 1.90, "err_kind": "sem", "runs": 20}}
  assert report.published_std(rec) == pytest.approx(1.90 * math.sqrt(20))
  assert report.verdict(rec) == "within 1 std"
  rec = {"mean": 95.0, "published": {"mean": 97.70, "err": 0.81, "err_kind": "std", "runs": 10}}
  assert report.verdict(rec) == "below by 1.89 beyond 1 std"


def test_bracketing_counts_noise_as_a_tie():
  joint = {"mean": 97.7, "std": 0.1}
  assert report.bracketing({"mean": 19.88, "std": 0.02}, {"mean": 19.85, "std": 0.05},
                              joint).endswith("yes, with a tie")
  assert report.bracketing({"mean": 50.0, "std": 0.1}, {"mean": 19.85, "std": 0.05},
                              joint).endswith("**no**")
  assert report.bracketing({"mean": 19.0, "std": 0.1}, {"mean": 20.0, "std": 0.1},
                              joint).endswith("— yes")


def test_splice_keeps_text_outside_markers():
  old = f"# Title\n\nintro\n\n{report.BEGIN}\nold tables\n{report.END}\n\nnotes\n"
  new = report.splice(old, f"{report.BEGIN}\nnew\n{report.END}")
  assert new == f"# Title\n\nintro\n\n{report.BEGIN}\nnew\n{report.END}\n\nnotes\n"
  assert report.splice(None, "X").endswith("\n\nX\n")


def _record(algo, accuracies, scenario="task", **fields):
  """A stored record of Hsu et al.'s Split MNIST with the fields the markdown reads."""
  mean, err = tables.HSU_SPLIT.published[algo][scenario]
  lam_paper = None if algo in ("finetune", "joint") else tables.HSU_SPLIT.lam[algo][scenario][0]
  rec = {"protocol": "hsu", "benchmark": "split", "scenario": scenario, "algo": algo,
         "seeds": [0, 1], "reduced": False, "variant": "full", "deviations": [],
         "lam_paper": lam_paper, "gamma_paper": None if lam_paper is None else 1.0,
         "lam": 1.0 if lam_paper is None else 2 * lam_paper, "gamma": 1.0, "epochs": 4,
         "steps_per_task": None, "reset_optimizer": False, "consolidated": "shared",
         "task_sizes": [12000, 11000], "hidden": [400, 400], "lr": 0.001, "batch_size": 128,
         "fisher": "predicted", "average_accuracy": accuracies,
         "mean": sum(accuracies) / len(accuracies),
         "std": abs(accuracies[0] - accuracies[1]) / 2,
         "published": {"mean": mean, "err": err, "err_kind": "std", "runs": 10},
         "wall_seconds": 12.3}
  return {**rec, **fields}


def test_store_merges_records_rereading_the_file(tmp_path):
  path = tmp_path / "r.json"
  assert store_lib.load_store(path) == {"records": {}}
  assert store_lib.variant_name([]) == "full"
  assert store_lib.variant_name(["a", "b"]) == "reduced[a; b]"
  key = store_lib.record_key("hsu", "split", "full", "task", "ewc")
  assert key == "hsu/split/full/task/ewc"
  store_lib.save(store_lib.add_record(path, key, _record("ewc", [97.0, 98.0]), {"device": "a"}),
                 path)
  # Another invocation adds its row: the file is re-read, so the first row is kept.
  other = store_lib.record_key("hsu", "split", "full", "task", "finetune")
  store = store_lib.add_record(path, other, _record("finetune", [90.0, 91.0]), {"device": "b"})
  assert set(store["records"]) == {key, other} and store["environment"] == {"device": "b"}
  store_lib.save(store, path)
  store = store_lib.add_record(path, key, _record("ewc", [99.0, 99.0]), {"device": "b"})
  assert store["records"][key]["mean"] == 99.0 and len(store["records"]) == 2  # replaced
  saved = json.loads(path.read_text())
  assert saved["updated"].endswith("+00:00") and set(saved["records"]) == {key, other}
  assert saved["records"][key]["mean"] == 97.5      # add_record alone writes nothing
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary file left
  # A record written before variants were named gets its name from its deviations.
  unnamed = {k: v for k, v in _record("l2", [98.0, 98.0], reduced=True,
                                      deviations=["2 tasks"]).items() if k != "variant"}
  path.write_text(json.dumps({"records": {"old key": unnamed}}))
  assert list(store_lib.load_store(path)["records"]) == ["hsu/split/reduced[2 tasks]/task/l2"]


def test_markdown_of_a_small_store():
  store = {"records": {f"hsu/split/full/task/{a}": _record(a, acc) for a, acc in
                       [("finetune", [93.0, 94.0]), ("ewc", [97.5, 98.5]),
                        ("joint", [99.0, 99.0])]},
           "environment": {"device": "cpu", "jax": "0.0"}, "updated": "2026-01-01T00:00:00+00:00"}
  md = report.render(store)
  lines = md.splitlines()
  assert lines[0] == report.BEGIN and lines[-1] == report.END
  assert ("Average test accuracy (%) over all tasks after the last task. Generated "
          "2026-01-01T00:00:00+00:00;") in md and "Machine: cpu, jax 0.0." in md
  assert "### Hsu et al. 2018, Split MNIST" in lines
  assert "| method | Task-IL ours | Task-IL paper |" in lines
  assert lines[lines.index("| method | Task-IL ours | Task-IL paper |") + 2:][:3] == [
      "| finetune (none) | 93.50 ± 0.50 | 93.46 ± 2.01 |",
      "| joint (offline) | 99.00 ± 0.00 | 99.52 ± 0.16 |",
      "| EWC | 98.00 ± 0.50 | 97.70 ± 0.81 |"]
  assert ("| Task-IL | EWC | 100 → 200 | – | 4 ep | 98.00 ± 0.50 (2) | 97.70 ± 0.81 std (10) | "
          "+0.30 | within 1 std | 12 |") in lines
  assert ("Bracketing (finetune ≤ EWC ≤ joint; a pair closer than the sum of its seeds' stds "
          "counts as a tie): Task-IL: finetune 93.50 ≤ EWC 98.00 ≤ joint 99.00 — yes.") in lines
  assert ("Task-IL finetune: 93.00, 94.00; Task-IL joint: 99.00, 99.00; Task-IL ewc: 97.50, "
          "98.50") in lines
  assert "Training length: the epochs per task of column *per task*" in md
  assert "Paper column: mean ± std over 10 runs." in md and "REDUCED" not in md


def test_committed_markdown_is_the_rendering_of_the_committed_store(tmp_path):
  """docs/results.md regenerated from docs/results.json is byte-identical."""
  committed = (ROOT / "docs" / "results.md").read_bytes()
  out = tmp_path / "results.md"
  out.write_bytes(committed)
  report.write_markdown(store_lib.load_store(ROOT / "docs" / "results.json"), out)
  assert out.read_bytes() == committed


def test_tiny_real_run_writes_markdown_and_json(tiny_mnist_dir, tmp_path):
  from experiments import data
  ds = data.load_dataset("mnist", data_dir=tiny_mnist_dir)
  out, store = tmp_path / "results.md", tmp_path / "results.json"
  out.write_text(f"# Mine\n\nhand-written\n\n{report.BEGIN}\nstale\n{report.END}\nafter\n")
  over = runner.Overrides(epochs=1, max_examples=300, num_tasks=2)
  runner.reproduce(tables.HSU_SPLIT, ["ewc"], ["task"], [0, 1], ds, out=out, json_path=store,
                   overrides=over, log=lambda *a, **k: None)

  records = json.loads(store.read_text())["records"]
  key = runner.row_key(tables.HSU_SPLIT, over, "task", "ewc")
  assert key == ("hsu/split/reduced[epochs per task = 1; first 300 train (and test) examples "
                 "per task; 2 tasks]/task/ewc")
  assert set(records) == {key}
  ewc = records[key]
  assert ewc["seeds"] == [0, 1] and ewc["reduced"] and ewc["epochs"] == 1
  assert (ewc["lam_paper"], ewc["lam"], ewc["fisher"]) == (100.0, 200.0, "predicted")
  acc = ewc["acc_matrix"]                                      # [seeds, T, T]
  assert len(acc) == 2 and len(acc[0]) == 2 and len(acc[0][0]) == 2
  assert all(60 < a <= 100 for a in ewc["average_accuracy"])   # 0/1 and 2/3 from 300 examples
  assert ewc["mean"] == pytest.approx(sum(ewc["average_accuracy"]) / 2)
  assert ewc["task_sizes"] == [300, 300] and ewc["wall_seconds"] > 0
  # Hsu's protocol: epochs per task, Adam kept across tasks (their reset_optimizer = False).
  assert (ewc["steps_per_task"], ewc["reset_optimizer"], ewc["consolidated"]) == (
      None, False, "shared")
  assert ewc["config"]["reset_optimizer"] is False and ewc["iterations_per_task"] == [3, 3]

  md = out.read_text()
  assert md.startswith("# Mine\n\nhand-written\n\n") and md.endswith("after\n")
  assert "stale" not in md and md.count(report.BEGIN) == 1
  assert "REDUCED" in md and "| Task-IL | EWC | 100 → 200 |" in md
  assert "| EWC | " in md and "97.70 ± 0.81" in md          # ours beside the paper's

  # Again: the stored row is kept (not trained); other seeds, or rerun=True, train it anew.
  lines = []
  runner.reproduce(tables.HSU_SPLIT, ["ewc"], ["task"], [0, 1], ds, out=out, json_path=store,
                   overrides=over,
                   log=lambda *a, **k: lines.append(" ".join(map(str, a))))
  assert json.loads(store.read_text())["records"][key] == ewc
  assert len(lines) == 1 and lines[0].endswith("kept (--rerun trains it again)"), lines
  runner.reproduce(tables.HSU_SPLIT, ["ewc"], ["task"], [0, 1], ds, out=out, json_path=store,
                   overrides=over,
                   log=lambda *a, **k: None, rerun=True)
  again = json.loads(store.read_text())["records"][key]
  assert again["acc_matrix"] == ewc["acc_matrix"] and again["wall_seconds"] != ewc["wall_seconds"]


@pytest.mark.extended
def test_iterations_protocol_trains_the_papers_iterations(tiny_mnist_dir, tmp_path):
  """van de Ven's protocol counts iterations per task (joint too, on the union of the tasks so
  far), keeps Adam across tasks and penalises the shared head; the record and the markdown say
  so. (The paper's 2,000 iterations are cut to 7 here: a reduced copy of the setup.)"""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from experiments import data  # pylint: disable=import-outside-toplevel
  ds = data.load_dataset("mnist", data_dir=tiny_mnist_dir)
  setup = dataclasses.replace(tables.VDV_SPLIT, iterations=7)
  assert tables.length_for(setup, "joint", [300, 300], None) == (None, 7)
  assert tables.length_for(setup, "joint", [300, 300], 2) == (1, None)  # --epochs override
  out, store = tmp_path / "results.md", tmp_path / "results.json"
  over = runner.Overrides(max_examples=300, num_tasks=2)
  runner.reproduce(setup, ["ewc", "joint"], ["domain"], [0, 1], ds, out=out,
                   json_path=store, overrides=over, log=lambda *a, **k: None)
  records = json.loads(store.read_text())["records"]
  ewc = records[runner.row_key(setup, over, "domain", "ewc")]
  joint = records[runner.row_key(setup, over, "domain", "joint")]
  for rec in (ewc, joint):
    assert (rec["epochs"], rec["steps_per_task"], rec["reset_optimizer"]) == (None, 7, False)
    assert rec["config"]["steps_per_task"] == 7 and rec["config"]["epochs"] is None
    assert rec["iterations_per_task"] == [7, 7] and rec["consolidated"] == "shared"
  assert ewc["lam"] == 1e6
  md = out.read_text()
  assert "kept across tasks, not reset" in md and "restarted" not in md
  assert "| Domain-IL | EWC | 1e+06 → 1e+06 | – | 7 it |" in md
  assert "7 iterations per task" in md and "union of tasks 1..t" in md


def test_records_of_the_earlier_runner_are_kept_apart(tmp_path):
  """A stored record without the protocol controls (the runner that restarted Adam, left the
  heads free and converted iterations to epochs) becomes its own reduced variant, never mixed
  with the papers' protocol."""
  rec = {"protocol": "vandeven", "benchmark": "split", "scenario": "domain", "algo": "ewc",
         "reduced": False, "deviations": [], "variant": "full", "epochs": 21}
  path = tmp_path / "r.json"
  path.write_text(json.dumps({"records": {"vandeven/split/full/domain/ewc": rec}}))
  (key, got), = store_lib.load_store(path)["records"].items()
  assert key == f"vandeven/split/reduced[{store_lib.EARLIER_RUNNER}]/domain/ewc"
  assert got["reduced"] and got["reset_optimizer"] and got["consolidated"] == "backbone"
  assert key != runner.row_key(tables.VDV_SPLIT, runner.Overrides(), "domain", "ewc")


def test_bad_combination_exits_2_with_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--protocol=hsu",
                         "--benchmark=permuted", f"--out={tmp_path / 'r.md'}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "--benchmark='permuted'" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "r.md").exists()


def _options(*argv):
  """The :class:`ReproduceConfig` of a command line (the global flags reset around it)."""
  reproduce.FLAGS.unparse_flags()
  try:
    reproduce.FLAGS(["reproduce", *argv])
    return reproduce.config_from_flags()
  finally:
    reproduce.FLAGS.unparse_flags()


def test_options_from_flags():
  opts = _options()
  assert opts.setup is tables.HSU_SPLIT and opts.algo_names == tables.HSU_SPLIT.algos
  assert opts.scenarios == tables.SCENARIOS and opts.seeds == (0, 1, 2)
  assert (opts.out_path, opts.json_path) == (Path("docs/results.md"), Path("docs/results.json"))
  assert opts.overrides == runner.Overrides() and opts.checkpoint and opts.checkpoint_every == 0
  opts = _options("--protocol=vandeven", "--benchmark=permuted", "--hidden=400,400",
                  "--epochs=6", "--algos=ewc", "--json=elsewhere/store.json")
  assert opts.setup is tables.VDV_PERMUTED and opts.algo_names == ("ewc",)
  assert opts.overrides == runner.Overrides(epochs=6, hidden=(400, 400))
  assert opts.json_path == Path("elsewhere/store.json")
  import dataclasses  # pylint: disable=import-outside-toplevel
  with pytest.raises(dataclasses.FrozenInstanceError):
    opts.seeds = (1,)


@pytest.mark.parametrize("argv,message", [
    (["--seeds=1,1"], "--seeds=1,1 is invalid: expected distinct seeds."),
    (["--seeds=a"], "--seeds=a is invalid: expected integers separated by commas."),
    (["--protocol=vandeven", "--algos=l2"], "--algos=l2 is invalid for --protocol=vandeven "
     "--benchmark=split: expected some of finetune, joint, ewc, online_ewc."),
    (["--scenarios=task,x"], "--scenarios=task,x is invalid: expected some of task, domain, "
     "class."),
    (["--scenarios="], "--scenarios= is invalid: expected at least one value (a comma-separated "
     "list)."),
    (["--num_tasks=6"], "--num_tasks=6 is invalid: expected 1..5."),
    (["--epochs=0"], "--epochs=0 is invalid: expected an integer >= 1."),
    (["--hidden=0"], "--hidden=0 is invalid: expected integers >= 1."),
    (["--lam_factor=0"], "--lam_factor=0.0 is invalid: expected a number > 0."),
    (["--checkpoint_every=-1"], "--checkpoint_every=-1 is invalid: expected an integer >= 0 "
     "(0: only after each task)."),
])
def test_options_errors_name_the_flag_value_and_what_is_allowed(argv, message):
  with pytest.raises(errors.SettingError) as err:
    _options(*argv)
  assert err.value.for_flags() == message


def test_each_departure_is_its_own_variant():
  assert runner.Overrides().variant == "full"
  check = runner.Overrides(lam_factor=0.1, epochs=5)
  assert check.reduced and check.variant.startswith("reduced[λ × 0.1 (a λ check")
  assert (runner.row_key(tables.VDV_PERMUTED, check, "domain", "ewc")
          != runner.row_key(tables.VDV_PERMUTED, runner.Overrides(epochs=5), "domain", "ewc"))


@pytest.mark.extended
def test_reproduce_killed_then_resumed_gives_the_same_record(tiny_mnist_dir, tmp_path):
  """The reproduction runner checkpoints its sweeps: killed (SIGKILL) after task 2 is trained,
  the same command resumes from the task-1 checkpoint; the record's matrices are bit-identical
  and the record's checkpoints are gone once it is stored."""
  import signal  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel

  def command(name, env=None):
    args = [sys.executable, "-m", "experiments.reproduce", "--protocol=hsu", "--algos=ewc",
            "--scenarios=task", "--seeds=0,1", "--epochs=1", "--max_examples=300",
            "--num_tasks=2", "--hidden=32", "--noprogress", f"--data_dir={tiny_mnist_dir}",
            f"--out={tmp_path / name / 'r.md'}", f"--workdir={tmp_path / name / 'work'}"]
    return args, {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}

  def records(name):
    store = json.loads((tmp_path / name / "r.json").read_text())
    return {k: (r["acc_matrix"], r["average_accuracy"]) for k, r in store["records"].items()}

  cmd, env = command("ref")
  assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
  marker = tmp_path / "marker"
  cmd, env = command("run", pause.pause_env("1:1:0", marker))
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 300
  while not marker.exists():
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  folders = list((tmp_path / "run" / "work" / "checkpoints").iterdir())
  assert len(folders) == 1 and (folders[0] / "chunk_0" / "0").is_dir()
  cmd, env = command("run")
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resuming from" in done.stdout and "(task 2, epoch 1, step 0)" in done.stdout
  assert records("run") == records("ref") and len(records("ref")) == 1
  assert not folders[0].exists()
