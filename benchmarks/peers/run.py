#!/usr/bin/env python3
"""Run our JAX EWC and the PyTorch peers on the same Split MNIST protocol and compare.

Stdlib only; runs with any python3 (3.8+). Each run is a fresh process whose whole
wall time (interpreter start to exit) is measured here with time.perf_counter around
subprocess.run. Runs are interleaved round robin (ours, plain_torch, clarena,
avalanche, ours, ...) so slow drifts of the machine hit every contender alike.

    python3 benchmarks/peers/run.py                       # 3 repeats, all peers + ours
    python3 benchmarks/peers/run.py --skip_ours --repeats=1
    python3 benchmarks/peers/run.py --peers=plain_torch,avalanche
    python3 benchmarks/peers/run.py --backbone=cnn --peers=plain_torch,avalanche

Peers need benchmarks/peers/.venv (bash benchmarks/peers/setup.sh). Ours is
`<repo>/.venv/bin/python -m experiments.split_mnist --algo=ewc --workdir=<tmpdir>`
(another checkout and interpreter: --ours_repo, --ours_python),
which writes <tmpdir>/results.json with "average_accuracy" and "timings" (its default:
orbax checkpoints after every task and two PNG plots), and, as "ours_same_work", the
same with --nocheckpoint --noplots: only the work the peers do. Before the timed runs, ours is
byte-compiled (`python -m compileall`, what a pip install does; the editable checkout has no
.pyc otherwise when PYTHONDONTWRITEBYTECODE is set) and run once untimed, so that every timed
run of ours finds its compile caches warm (a user's second run); the warm-up's wall and
compile seconds are recorded under settings.ours_warmup.

--backbone=cnn runs everyone with the CNN of flax/examples/mnist instead of the MLP: the peers
get --backbone=cnn, ours gets --backbone=cnn (checked first with `--helpfull`: a checkout whose
experiments.split_mnist has no --backbone flag runs the peers only, with a note).

Output: JSON on stdout and in benchmarks/results/peers.json (peers_cnn.json with
--backbone=cnn; --out): per contender the
median whole-process wall time, median phase timings, the final average accuracy
(AA) of every run, speedup_vs_<peer> = median wall(peer) / median wall(ours) and
same_work_speedup[<peer>] = median wall(peer) / median wall(ours_same_work); under "versions",
Python's and every dependency's version in ours' and in the peers' interpreter
(benchmarks/versions.py).
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

try:
    import resource
except ImportError:  # not on Unix
    resource = None

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PEERS = {
    "plain_torch": "plain_torch_ewc.py",
    "clarena": "clarena_ewc.py",
    "avalanche": "avalanche_ewc.py",
}
PEERS_PY = os.path.join(HERE, ".venv", "bin", "python")
PEER_DISTRIBUTIONS = ("torch", "torchvision", "clarena", "avalanche-lib")
BACKBONE_DESCRIPTIONS = {
    "mlp": "MLP 784-400-400 ReLU",
    "cnn": ("CNN of flax/examples/mnist without its classifier: [28,28,1] -> Conv 32 3x3 SAME "
            "-> ReLU -> avg pool 2x2/2 -> Conv 64 3x3 SAME -> ReLU -> avg pool 2x2/2 -> "
            "flatten 3136 -> Dense 256 -> ReLU"),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def tail(text, n=2000):
    text = text or ""
    return text[-n:]


def last_json_line(stdout):
    for line in reversed((stdout or "").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line on stdout")


def children_cpu_s():
    if resource is None:
        return None
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_run(cmd, cwd, timeout, env=None):
    """(wall_s, cpu_s, proc, error): wall time by perf_counter around subprocess.run;
    cpu_s = user+sys CPU seconds of the child (less sensitive to a busy machine)."""
    c0 = children_cpu_s()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, None, None, "timeout after %ss" % timeout
    wall = time.perf_counter() - t0
    c1 = children_cpu_s()
    return wall, (None if c0 is None else c1 - c0), proc, None


def run_recorded(cmd, cwd, timeout, env=None):
    """Runs ``cmd`` timed; returns (record, proc); the record holds "error" when it failed."""
    wall, cpu, proc, err = timed_run(cmd, cwd, timeout, env)
    rec = {"wall_s": wall, "cpu_s": cpu, "cmd": " ".join(shlex.quote(c) for c in cmd)}
    if err:
        rec["error"] = err
    elif proc.returncode != 0:
        rec["error"] = "exit %d: %s" % (proc.returncode, tail(proc.stderr))
    return rec, proc


def run_peer(name, args):
    cmd = [PEERS_PY, os.path.join(HERE, PEERS[name]), "--seed", str(args.seed),
           "--epochs", str(args.epochs), "--threads", str(args.threads),
           "--backbone", args.backbone]
    if args.lam is not None:
        cmd += ["--lam", str(args.lam)]
    env = dict(os.environ)
    if args.omp_passive:
        env["OMP_WAIT_POLICY"] = "passive"
    rec, proc = run_recorded(cmd, HERE, args.timeout, env)
    if "error" in rec:
        return rec
    try:
        out = last_json_line(proc.stdout)
    except ValueError as e:
        rec["error"] = "%s; stdout tail: %s" % (e, tail(proc.stdout))
        return rec
    rec.update(average_accuracy=out["average_accuracy"], timings=out["timings"],
               acc_matrix=out.get("acc_matrix"),
               params={k: v for k, v in out.items()
                       if k not in ("peer", "average_accuracy", "acc_matrix", "timings")})
    return rec


def ours_missing_reason(args):
    if not os.path.exists(args.ours_python):
        return "%s does not exist (create the repo's JAX venv first)" % args.ours_python
    if not (os.path.exists(os.path.join(args.ours_repo, "experiments", "split_mnist.py"))
            or os.path.isdir(os.path.join(args.ours_repo, "experiments", "split_mnist"))):
        return "experiments/split_mnist(.py) not found in %s" % args.ours_repo
    return None


def ours_backbone_missing_reason(args):
    """Why our command cannot take --backbone=<args.backbone> (None when it can): the flag is
    looked for in `python -m experiments.split_mnist --helpfull`."""
    if args.backbone == "mlp":  # our default: no flag passed
        return None
    cmd = [args.ours_python, "-m", "experiments.split_mnist", "--helpfull"]
    try:
        proc = subprocess.run(cmd, cwd=args.ours_repo, capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        return "`%s` timed out" % " ".join(cmd)
    if not re.search(r"--backbone\b", (proc.stdout or "") + (proc.stderr or "")):
        return ("experiments.split_mnist in %s has no --backbone flag (our CNN backbone is "
                "not in this checkout)" % args.ours_repo)
    return None


# "ours": the default command (checkpoints after every task, PNG plots). "ours_same_work": the
# work the peers do (train, Fisher, evaluate, write the accuracies), nothing more.
SAME_WORK_ARGS = ["--nocheckpoint", "--noplots"]


OURS_LAM = 1000.0


def run_ours(args, extra=()):
    workdir = tempfile.mkdtemp(prefix="ewc_ours_")
    # Ours runs at the lambda of the committed peer comparison (our task-IL default until the
    # validation sweep of experiments/defaults.py chose another): the same work as before.
    lam = args.lam if args.lam is not None else OURS_LAM
    cmd = [args.ours_python, "-m", "experiments.split_mnist", "--algo=ewc", "--lam=%g" % lam,
           "--workdir=%s" % workdir]
    if args.backbone != "mlp":
        cmd.append("--backbone=%s" % args.backbone)
    cmd += list(extra) + shlex.split(args.ours_args)
    try:
        rec, proc = run_recorded(cmd, args.ours_repo, args.timeout)
        if "error" in rec:
            return rec
        path = os.path.join(workdir, "results.json")
        if not os.path.exists(path):
            rec["error"] = "%s was not written; stderr tail: %s" % (path, tail(proc.stderr))
            return rec
        with open(path) as f:
            res = json.load(f)
        rec["average_accuracy"] = res.get("average_accuracy")
        rec["timings"] = {k: v for k, v in (res.get("timings") or {}).items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if "acc_matrix" in res:
            rec["acc_matrix"] = res["acc_matrix"]
        return rec
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs):
    ok = [r for r in runs if "error" not in r]
    out = {"runs_ok": len(ok), "runs_failed": len(runs) - len(ok)}
    if len(ok) < len(runs):
        out["errors"] = [r["error"] for r in runs if "error" in r]
    if not ok:
        return out
    out["median_wall_s"] = round(median([r["wall_s"] for r in ok]), 3)
    out["min_wall_s"] = round(min(r["wall_s"] for r in ok), 3)
    out["wall_s"] = [round(r["wall_s"], 3) for r in ok]
    cpus = [r.get("cpu_s") for r in ok]
    if all(c is not None for c in cpus):
        out["median_cpu_s"] = round(median(cpus), 3)
        out["cpu_s"] = [round(c, 3) for c in cpus]
    keys = []
    for r in ok:
        for k in r.get("timings") or {}:
            if k not in keys:
                keys.append(k)
    out["median_timings_s"] = {
        k: round(median([(r.get("timings") or {}).get(k) for r in ok]), 4) for k in keys}
    aas = [r.get("average_accuracy") for r in ok]
    out["average_accuracy"] = aas
    out["median_average_accuracy"] = median(aas)
    out["last_acc_matrix"] = ok[-1].get("acc_matrix")
    if ok[-1].get("params"):
        out["params"] = ok[-1]["params"]
    out["cmd"] = ok[-1]["cmd"]
    return out


def dependency_versions(python, extra=()):
    """Python's and every dependency's version as seen by interpreter ``python``: one home,
    benchmarks/versions.py (stdlib only), run by that interpreter; None when it cannot run."""
    script = os.path.join(REPO, "benchmarks", "versions.py")
    try:
        out = subprocess.run([python, script] + list(extra), capture_output=True, text=True,
                             timeout=60).stdout
        return json.loads(out.strip().splitlines()[-1])
    except Exception:
        return None


def git_commit(repo=REPO):
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated subset of: " + ",".join(PEERS))
    p.add_argument("--skip_ours", action="store_true", help="run the peers only")
    p.add_argument("--seed", type=int, default=0, help="same seed for every repeat")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--backbone", choices=("mlp", "cnn"), default="mlp",
                   help="mlp: 784-400-400 ReLU (default); cnn: the CNN of flax/examples/mnist "
                        "without its classifier, passed as --backbone=cnn to the peers and to "
                        "ours (default --out: benchmarks/results/peers_cnn.json)")
    p.add_argument("--lam", type=float, default=None,
                   help="common-convention EWC lambda for the peers "
                        "(default: each script's default)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads for the peers (default 2 = the machine)")
    p.add_argument("--omp_passive", action="store_true",
                   help="run the peers with OMP_WAIT_POLICY=passive. On a machine busier "
                        "than its cores, torch's 2-thread OpenMP team spin-waits at every "
                        "op and runs 10-30x slower; passive waiting avoids that (see "
                        "README). Default: torch's defaults.")
    p.add_argument("--ours_args", default="",
                   help="extra arguments appended to our command, e.g. '--seed=0'")
    p.add_argument("--ours_repo", default=REPO,
                   help="checkout whose experiments.split_mnist is ours (default: this one)")
    p.add_argument("--ours_python", default=None,
                   help="interpreter for ours (default: <ours_repo>/.venv/bin/python)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--out", default=None,
                   help="default: benchmarks/results/peers.json (peers_cnn.json with "
                        "--backbone=cnn)")
    args = p.parse_args()
    args.ours_repo = os.path.abspath(args.ours_repo)
    if args.ours_python is None:
        args.ours_python = os.path.join(args.ours_repo, ".venv", "bin", "python")
    if args.out is None:
        args.out = os.path.join(REPO, "benchmarks", "results",
                                "peers.json" if args.backbone == "mlp" else
                                "peers_%s.json" % args.backbone)

    peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    unknown = [s for s in peers if s not in PEERS]
    if unknown:
        p.error("unknown peer(s) %s; choose from %s" % (unknown, ",".join(PEERS)))
    if peers and not os.path.exists(PEERS_PY):
        sys.exit("run.py: %s not found. Create it with: bash benchmarks/peers/setup.sh"
                 % PEERS_PY)

    with_ours = not args.skip_ours
    ours_note = None
    if with_ours:
        reason = ours_missing_reason(args) or ours_backbone_missing_reason(args)
        if reason:
            ours_note = "our run skipped: " + reason
            log("run.py: WARNING: %s. Continuing with the peers only; no speedups "
                "will be reported. Use --skip_ours to silence this." % ours_note)
            with_ours = False

    order = (["ours", "ours_same_work"] if with_ours else []) + peers
    if not order:
        p.error("nothing to run")
    runs = {name: [] for name in order}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    warmup = None
    if with_ours:  # untimed: byte-compile ours (as a pip install would) and fill its caches
        subprocess.run([args.ours_python, "-m", "compileall", "-q", "ewc_jax", "experiments"],
                       cwd=args.ours_repo, capture_output=True)
        log("run.py: warm-up run of ours (untimed) ...")
        rec = run_ours(args)
        warmup = {"wall_s": rec["wall_s"], "compile_s": rec.get("timings", {}).get("compile"),
                  "error": rec.get("error")}
        if "error" in rec:
            log("run.py:   warm-up FAILED: %s" % rec["error"][:500])

    for rep in range(args.repeats):
        for name in order:
            log("run.py: repeat %d/%d: %s ..." % (rep + 1, args.repeats, name))
            rec = (run_ours(args) if name == "ours" else
                   run_ours(args, SAME_WORK_ARGS) if name == "ours_same_work" else
                   run_peer(name, args))
            runs[name].append(rec)
            if "error" in rec:
                log("run.py:   FAILED after %.1fs: %s" % (rec["wall_s"], rec["error"][:500]))
            else:
                log("run.py:   %.1fs wall, %s CPU, AA=%s, timings=%s"
                    % (rec["wall_s"],
                       "?" if rec.get("cpu_s") is None else "%.1fs" % rec["cpu_s"],
                       rec["average_accuracy"], json.dumps(rec["timings"])))

    results = {name: summarize(rs) for name, rs in runs.items()}
    report = {
        "benchmark": "split_mnist_til_ewc_vs_peers",
        "protocol": ("Split MNIST task-incremental, 5 tasks {0,1}..{8,9}, labels 0/1 per "
                     "task; %s + 2-way head per task; Adam lr 1e-3 fresh "
                     "per task; batch 128 (last partial kept), shuffled each epoch; "
                     "%d epochs per task; diagonal Fisher on each task's train data; "
                     "AA = mean test accuracy over the 5 tasks after the last task"
                     % (BACKBONE_DESCRIPTIONS[args.backbone], args.epochs)),
        "wall_time": "whole process, time.perf_counter around subprocess.run; medians "
                     "over %d interleaved repeats" % args.repeats,
        "started_utc": started,
        "git_commit": git_commit(),
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "cpu_count": os.cpu_count(),
                    "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "settings": {"repeats": args.repeats, "backbone": args.backbone, "seed": args.seed,
                     "epochs": args.epochs,
                     "lam": args.lam, "torch_threads": args.threads,
                     "omp_wait_policy_passive": args.omp_passive,
                     "peers": peers, "skip_ours": args.skip_ours,
                     "ours_repo": args.ours_repo, "ours_python": args.ours_python,
                     "ours_warmup": warmup},
        "versions": {"ours": dependency_versions(args.ours_python) if with_ours else None,
                     "peers": dependency_versions(PEERS_PY, PEER_DISTRIBUTIONS)
                     if peers else None},
        "results": results,
    }
    if args.ours_repo != REPO:
        report["ours_git_commit"] = git_commit(args.ours_repo)
    if ours_note:
        report["note"] = ours_note
    lb = report["machine"]["loadavg_before"]
    la = report["machine"]["loadavg_after"]
    ncpu = os.cpu_count() or 1
    if lb and la and max(lb[0], la[0]) > ncpu:
        report["load_warning"] = (
            "load average %.1f/%.1f (before/after) exceeds the %d cores: other jobs shared "
            "the machine, wall times are inflated (torch with 2 OpenMP threads far more "
            "than the rest unless --omp_passive); compare min_wall_s and cpu_s too"
            % (lb[0], la[0], ncpu))
        log("run.py: WARNING: " + report["load_warning"])
    ours_wall = results.get("ours", {}).get("median_wall_s")
    ours_min = results.get("ours", {}).get("min_wall_s")
    if ours_wall:
        for name in peers:
            w = results[name].get("median_wall_s")
            if w:
                report["speedup_vs_%s" % name] = round(w / ours_wall, 3)
        # Same ratio from the fastest run of each: less sensitive to other jobs on a
        # shared machine (interference only ever adds time).
        report["speedup_min_wall"] = {
            name: round(results[name]["min_wall_s"] / ours_min, 3)
            for name in peers if results[name].get("min_wall_s")}
    same = results.get("ours_same_work", {}).get("median_wall_s")
    if same:  # ours doing only what the peers do: no checkpoints, no plots
        report["same_work_args"] = " ".join(SAME_WORK_ARGS)
        report["same_work_speedup"] = {
            name: round(results[name]["median_wall_s"] / same, 3)
            for name in peers if results[name].get("median_wall_s")}

    # indent=2, but lists of numbers (wall times, accuracy-matrix rows) on one line
    text = re.sub(r"\[\s+([-+0-9.eE,\s]+?)\s+\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]",
                  json.dumps(report, indent=2))
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    log("run.py: wrote %s" % args.out)
    failed = sum(r.get("runs_failed", 0) for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
