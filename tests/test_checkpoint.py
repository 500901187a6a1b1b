"""ewc_jax.checkpoint in-process: anchors round trip, run state save/restore/resume, config check.

The command line (kill with SIGKILL, resume, compare) is tested in tests/test_resume_cli.py.
"""

import dataclasses
import gc
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import corrupt
import ewc_jax
from ewc_jax import Anchor, checkpoint, continual, heads

T = 3


def tasks(n, seed, dtype=np.uint8):
  """T binary tasks of 16 features (different sizes: one program serves all)."""
  from ewc_jax.continual.task_data import pad_tasks  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  directions = np.random.default_rng(0).normal(size=(T, 16))
  xs, ys = [], []
  for t in range(T):
    x = rng.integers(0, 256, (n - 5 * t, 16)).astype(dtype)
    xs.append(x)
    ys.append(((x.astype(np.float32) / 255 - 0.5) @ directions[t] > 0).astype(np.int32))
  return pad_tasks(xs, ys)


CFG = continual.Config(epochs=2, batch_size=16, hidden=(16,), lam=100.0, chunk_steps=4,
                       fisher_batch_size=32)
IDENTITY = {"benchmark": "synthetic", **dataclasses.asdict(CFG)}


def run(cfg=CFG, **kw):
  net = heads.task_incremental(T, 2, hidden=cfg.hidden)
  return net, continual.run(cfg, net, tasks(90, 0), tasks(40, 1), **kw)


# ------------------------------------------------------------------------------------------------
# Anchors.

def _params(seed, dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"dense": {"w": jax.random.normal(k1, (3, 4)).astype(dtype),
                    "b": jax.random.normal(k2, (4,)).astype(dtype)},
          "extra": (jnp.arange(2.0, dtype=dtype), jnp.ones((1,), dtype))}


def _anchor(seed, dtype=jnp.float32):
  p = _params(seed, dtype)
  return Anchor(params=p, importance=jax.tree.map(lambda x: jnp.abs(x) + seed, p))


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_anchor_sequence_round_trip_with_and_without_like(tmp_path, dtype):
  anchors = (_anchor(1, dtype), _anchor(2, dtype))
  ewc_jax.save_anchors(tmp_path / "a", anchors)
  got = ewc_jax.restore_anchors(tmp_path / "a", like=anchors)
  _assert_tree_equal(got, anchors)
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), anchors)
  _assert_tree_equal(ewc_jax.restore_anchors(tmp_path / "a", like=like), anchors)
  raw = ewc_jax.restore_anchors(tmp_path / "a")  # generic containers, same values
  assert isinstance(raw, tuple) and all(isinstance(a, Anchor) for a in raw)
  for r, a in zip(raw, anchors):
    np.testing.assert_array_equal(np.asarray(r.params["dense"]["w"]),
                                  np.asarray(a.params["dense"]["w"]))
    np.testing.assert_array_equal(np.asarray(r.importance["extra"][1]),
                                  np.asarray(a.importance["extra"][1]))
  # The penalty is the same with the restored anchors.
  p = _params(7, dtype)
  assert float(ewc_jax.ewc_loss(p, got, lam=3.0)) == float(ewc_jax.ewc_loss(p, anchors, lam=3.0))


def test_stacked_and_empty_anchors_round_trip(tmp_path):
  stacked = ewc_jax.stack_anchors([_anchor(1), _anchor(2), _anchor(3)])
  ewc_jax.save_anchors(tmp_path / "s", stacked)
  _assert_tree_equal(ewc_jax.restore_anchors(tmp_path / "s", like=stacked), stacked)
  raw = ewc_jax.restore_anchors(tmp_path / "s")
  assert isinstance(raw, Anchor) and raw.params["dense"]["w"].shape == (3, 3, 4)
  ewc_jax.save_anchors(tmp_path / "e", ())
  assert ewc_jax.restore_anchors(tmp_path / "e") == ()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_anchor_persistence_errors_name_the_problem(tmp_path):
  anchors = [_anchor(1)]
  ewc_jax.save_anchors(tmp_path / "a", anchors)
  with pytest.raises(ValueError, match="already exists"):
    ewc_jax.save_anchors(tmp_path / "a", anchors)
  ewc_jax.save_anchors(tmp_path / "a", anchors + [_anchor(2)], overwrite=True)
  with pytest.raises(ValueError, match="sequence of 1 anchors"):
    ewc_jax.restore_anchors(tmp_path / "a", like=anchors)
  with pytest.raises(ValueError, match="stacked"):
    ewc_jax.restore_anchors(tmp_path / "a", like=ewc_jax.stack_anchors(anchors))
  mismatched = {"dense": jax.tree.map(jnp.abs, _params(1)["dense"])}
  with pytest.raises(ValueError, match=r"`Anchor\.importance` does not match `Anchor\.params`"):
    Anchor(params=_params(1), importance=mismatched)           # refused when it is built
  with pytest.raises(ValueError, match=r"anchors\[0\]\.importance"):
    ewc_jax.save_anchors(tmp_path / "b", [(_params(1), mismatched)])   # a plain pair
  neg = jax.tree.map(lambda x: -jnp.ones_like(x), _params(1))
  with pytest.raises(ValueError, match=r"anchors\[0\]\.importance"):
    ewc_jax.save_anchors(tmp_path / "c", [(_params(1), neg)])   # a plain (params, F) pair
  with pytest.raises(ValueError, match="Anchor.importance"):
    Anchor(params=_params(1), importance=neg)                  # refused when it is built
  with pytest.raises(ValueError, match="not a folder"):
    ewc_jax.restore_anchors(tmp_path / "nowhere")
  # A damaged folder: every array file truncated.
  for path in (tmp_path / "a").rglob("*"):
    if path.is_file() and "/d/" in str(path):
      path.write_bytes(path.read_bytes()[:3])
  with pytest.raises(ValueError, match="cannot restore anchors from"):
    ewc_jax.restore_anchors(tmp_path / "a")
  gc.collect()  # orbax's failed read leaves asyncio callbacks: collect them here, ignored


# ------------------------------------------------------------------------------------------------
# The run state: one run checkpointed after every chunk and task, shared by the tests below.

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  folder = tmp_path_factory.mktemp("run") / "ck"
  with checkpoint.RunCheckpointer(folder, IDENTITY, keep=1000, every=1,
                                  chunk_steps=CFG.chunk_steps) as ckpt:
    net, full = run(on_checkpoint=ckpt)
  like = continual.abstract_run_state(CFG, net, tasks(90, 0))
  return folder, full, like, ckpt.saved_steps


def _copy(folder, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  return Path(shutil.copytree(folder, tmp_path / "ck"))


def test_resume_from_a_checkpoint_is_exact(saved_run):
  """Restored mid-epoch, or between training and consolidation: the rest of the run is the same."""
  folder, full, like, steps = saved_run
  ckpt = checkpoint.RunCheckpointer(folder, IDENTITY)
  assert len(steps) == ckpt.latest_step() + 1 > 3 * 2 * 2  # every chunk and every task
  metas = {s: ckpt.read_meta(s) for s in steps}
  mid_epoch = next(s for s in steps if metas[s]["task"] == 1 and metas[s]["epoch"] == 1
                   and metas[s]["step"] > 0)
  before_fisher = next(s for s in steps if metas[s]["task"] == 1 and metas[s]["epoch"] == 2)
  assert metas[mid_epoch]["epoch_sums"] and metas[before_fisher]["reason"] == "chunk"
  for step in (mid_epoch, before_fisher):
    rs = ckpt.restore(like, step=step)
    assert jax.tree.structure(rs.train_state) == jax.tree.structure(like["train_state"])
    _, resumed = run(resume=rs)
    np.testing.assert_array_equal(resumed.acc_matrix, full.acc_matrix)
    assert resumed.curves == full.curves
    _assert_tree_equal(resumed.params, full.params)
    _assert_tree_equal(resumed.memory, full.memory)
  last = ckpt.restore(like)  # the final checkpoint holds the finished run
  assert last.task == T and last.curves == full.curves
  np.testing.assert_array_equal(last.acc, full.acc_matrix)
  ckpt.close()


def test_other_config_is_refused_naming_the_keys(saved_run):
  folder = saved_run[0]
  other = dict(IDENTITY, lam=5.0, algo="l2")
  with pytest.raises(checkpoint.CheckpointError) as err:
    checkpoint.RunCheckpointer(folder, other).check_config()
  msg = str(err.value)
  assert "lam (checkpoint: 100.0, now: 5.0)" in msg and "algo (checkpoint: 'ewc', now: 'l2')" in msg
  assert str(folder) in msg and "`force_restart`" in msg  # the CLI says --force_restart
  assert checkpoint.config_diff(IDENTITY, dict(IDENTITY, hidden=[16])) == []  # tuple == list


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_checkpoint_falls_back_and_none_left_is_refused(saved_run, tmp_path):
  """Truncated array files, one flipped bit, bits in 8 arrays, a changed digit in the metadata:
  the newest checkpoint is skipped for the previous one with one warning; with none left, the
  restore is refused naming the newest (never restored silently)."""
  folder = _copy(saved_run[0], tmp_path)
  like, steps = saved_run[2], sorted(saved_run[3])
  newest = folder / str(steps[-1])
  for path in (newest / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
  lines = []
  with checkpoint.RunCheckpointer(folder, IDENTITY, warn=lines.append) as ckpt:
    rs = ckpt.restore(like)
    assert ckpt.restored_step == steps[-2] and rs is not None
  (line,) = lines
  assert str(newest) in line and f"previous one, {folder / str(steps[-2])}" in line
  expected = checkpoint.RunCheckpointer(folder, IDENTITY).restore(like, step=steps[-2])
  _assert_tree_equal(rs.train_state.params, expected.train_state.params)
  # One flipped bit inside an array (float data are stored raw: only the checksum sees it),
  # then a bit in each of 8 arrays.
  for count, step in ((1, steps[-2]), (8, steps[-3])):
    state = checkpoint.RunCheckpointer(folder, IDENTITY).restore(like, step=step)
    corrupt.flip_bits_in_arrays(folder / str(step), jax.tree.leaves(jax.device_get(
        (state.train_state, state.memory))), count)
    lines = []
    with checkpoint.RunCheckpointer(folder, IDENTITY, warn=lines.append) as ckpt:
      ckpt.restore(like)
      assert ckpt.restored_step == steps[steps.index(step) - 1]
    assert any(str(folder / str(step)) in l for l in lines), lines
  # A changed digit in the metadata (the accuracy matrix): its checksum.
  meta_file = folder / str(steps[-4]) / "meta" / "metadata"
  text = meta_file.read_text()
  i = text.index('"acc": [[') + len('"acc": [[')
  meta_file.write_text(text[:i] + ("1" if text[i] != "1" else "2") + text[i + 1:])
  lines = []
  with checkpoint.RunCheckpointer(folder, IDENTITY, warn=lines.append) as ckpt:
    ckpt.restore(like)
    assert ckpt.restored_step == steps[-5]
  assert "metadata do not match their checksum" in lines[-1]
  # Nothing intact left: refused, naming the newest and --force_restart.
  for step in steps[:-4]:
    (folder / str(step) / "meta" / "metadata").write_text("{not json")
  with pytest.raises(checkpoint.CorruptCheckpoint) as err:
    checkpoint.RunCheckpointer(folder, IDENTITY, warn=lambda line: None).restore(like)
  assert str(newest) in str(err.value) and "--force_restart" in err.value.for_flags()
  (newest / "meta" / "metadata").write_text("{not json")
  with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
    checkpoint.RunCheckpointer(folder, IDENTITY).restore(like, step=steps[-1])
  gc.collect()  # see above


def test_a_save_that_never_finished_is_ignored_and_numbering_continues(saved_run, tmp_path):
  """A step folder still named *.orbax-checkpoint-tmp (killed before its rename) is not used."""
  folder = _copy(saved_run[0], tmp_path)
  like = saved_run[2]
  latest = checkpoint.RunCheckpointer(folder, IDENTITY).latest_step()
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(folder / str(latest), folder / f"{latest + 1}.orbax-checkpoint-tmp")
  (folder / f"{latest + 1}.orbax-checkpoint-tmp" / "commit_success.txt").unlink()
  with checkpoint.RunCheckpointer(folder, IDENTITY, keep=2) as again:
    assert again.latest_step() == latest
    rs = again.restore(like)
    assert again.save(rs, "task") == latest + 1
  names = sorted(os.listdir(folder), key=int)
  assert names == [str(latest), str(latest + 1)]  # keep=2 pruned the rest; no tmp folder left


def test_non_finite_state_is_never_saved(tmp_path):
  ckpt = checkpoint.RunCheckpointer(tmp_path / "ck", IDENTITY)

  def hook(rs, reason):
    if rs.task == 1 and reason == "task":
      rs = rs._replace(train_state=rs.train_state._replace(params=jax.tree.map(
          lambda x: x * jnp.nan, rs.train_state.params)))
    ckpt(rs, reason)

  with pytest.raises(continual.NumericalError, match="parameters are not finite after task 1"):
    run(dataclasses.replace(CFG, epochs=1), on_checkpoint=hook)
  ckpt.close()
  assert checkpoint.RunCheckpointer(tmp_path / "ck", IDENTITY).latest_step() is None


def test_sgd_run_state_restores_and_resumes_exactly(tmp_path):
  """--optimizer=sgd: the abstract state (the restore target) has SGD's structure, a checkpoint
  of an SGD run restores into it and the resumed run equals the uninterrupted one; an Adam
  config refuses that checkpoint (the optimizer is part of the config)."""
  cfg = dataclasses.replace(CFG, optimizer="sgd", lr=0.05)
  identity = {"benchmark": "synthetic", **dataclasses.asdict(cfg)}
  with checkpoint.RunCheckpointer(tmp_path / "ck", identity, keep=1000, every=1,
                                  chunk_steps=cfg.chunk_steps) as saver:
    net, full = run(cfg, on_checkpoint=saver)
  like = continual.abstract_run_state(cfg, net, tasks(90, 0))
  adam_like = continual.abstract_run_state(CFG, net, tasks(90, 0))
  assert jax.tree.structure(like["train_state"]) != jax.tree.structure(adam_like["train_state"])
  ckpt = checkpoint.RunCheckpointer(tmp_path / "ck", identity)
  step = next(s for s in saver.saved_steps if ckpt.read_meta(s)["task"] == 1)
  rs = ckpt.restore(like, step=step)
  assert jax.tree.structure(rs.train_state) == jax.tree.structure(like["train_state"])
  assert float(rs.train_state.opt_state.hyperparams["learning_rate"]) == pytest.approx(0.05)
  _, resumed = run(cfg, resume=rs)
  np.testing.assert_array_equal(resumed.acc_matrix, full.acc_matrix)
  assert resumed.curves == full.curves
  with pytest.raises(checkpoint.CheckpointError, match="optimizer"):
    checkpoint.RunCheckpointer(tmp_path / "ck", {**identity, "optimizer": "adam"}).check_config()


def test_checkpoints_from_before_the_optimizer_field_count_as_adam():
  saved = {k: v for k, v in IDENTITY.items() if k != "optimizer"}
  assert checkpoint.config_diff(saved, IDENTITY) == []
  assert checkpoint.config_diff(saved, {**IDENTITY, "optimizer": "sgd"}) == [
      "optimizer (checkpoint: 'adam', now: 'sgd')"]


# ------------------------------------------------------------------------------------------------
# The closed-loop filter: scoped to the open checkpointers, the process's hooks left as they were.

def test_closed_loop_filter_is_scoped_and_nests(monkeypatch):
  """Only the outermost scope installs the filter and only its end takes it out; a hook installed
  over it meanwhile is kept (the filter then passes everything through)."""
  from types import SimpleNamespace  # pylint: disable=import-outside-toplevel
  from ewc_jax import orbax_io  # pylint: disable=import-outside-toplevel
  seen = []

  def previous(unraisable):
    seen.append(str(unraisable.exc_value))

  monkeypatch.setattr(sys, "unraisablehook", previous)
  monkeypatch.setattr(orbax_io, "_scopes", 0)   # as in a fresh process, whatever ran before
  monkeypatch.setattr(orbax_io, "_filter", None)
  noise = SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = SimpleNamespace(exc_value=RuntimeError("a real error"))
  with orbax_io.closed_loop_noise_dropped():
    with orbax_io.closed_loop_noise_dropped():
      assert sys.unraisablehook is not previous
      sys.unraisablehook(noise)
      sys.unraisablehook(other)
    sys.unraisablehook(noise)                   # the outer scope still filters
  assert sys.unraisablehook is previous and seen == ["a real error"]
  sys.unraisablehook(noise)
  assert seen == ["a real error", "Event loop is closed"]
  with orbax_io.closed_loop_noise_dropped():
    ours = sys.unraisablehook
    sys.unraisablehook = theirs = lambda u: ours(u)  # noqa: E731 (someone wraps the filter)
  assert sys.unraisablehook is theirs
  theirs(noise)                                 # inert: passed on to the previous hook
  assert seen[-1] == "Event loop is closed" and len(seen) == 3


HOOKS_AND_FAILED_SAVE = r"""
import json, resource, shutil, signal, sys, threading
from pathlib import Path
sys.path.insert(0, "tests")
import test_checkpoint as tc
from ewc_jax import checkpoint, continual

heard = []
sys.unraisablehook = lambda u: heard.append(repr(u.exc_value))
hooks = lambda: [sys.excepthook, sys.unraisablehook, threading.excepthook]
before = hooks()
out = {}
from experiments import orbax_logs
orbax_logs.quiet_orbax_errors()  # as the command line without --debug
root = Path(sys.argv[1])
with checkpoint.RunCheckpointer(root / "ok", tc.IDENTITY, chunk_steps=tc.CFG.chunk_steps) as ck:
  net, _ = tc.run(on_checkpoint=ck)
  out["open"] = sys.unraisablehook is not before[1]
out["closed"] = hooks() == before

# A corrupt checkpoint: the read fails, its late callbacks are dropped while the checkpointer is
# open; after it closes the hooks are the process's again and none of that noise reached them.
bad = Path(shutil.copytree(root / "ok", root / "bad"))
for path in bad.rglob("*"):  # every step (a corrupt newest one alone falls back on the previous)
  if path.is_file() and path.parent.name == "d":
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
like = continual.abstract_run_state(tc.CFG, net, tc.tasks(90, 0))
try:
  with checkpoint.RunCheckpointer(bad, tc.IDENTITY) as ck:
    ck.restore(like)
except checkpoint.CheckpointError as err:
  out["corrupt"] = str(err)
out["after_corrupt"] = hooks() == before

# A save that fails (files limited to 4 KiB after the first checkpoint, as on a full disk).
def limited(rs, reason):
  ck(rs, reason)
  if ck.saved_steps == [0]:
    ck.wait()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
  with checkpoint.RunCheckpointer(root / "full", tc.IDENTITY) as ck:
    tc.run(on_checkpoint=limited)
except checkpoint.CheckpointError as err:
  out["failed_save"] = str(err)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
out["after_failed_save"] = hooks() == before
out["heard"] = heard
print(json.dumps(out))
"""


def test_hooks_are_the_processs_again_once_a_checkpointer_closes_and_errors_stay_one_line(
    tmp_path):
  """In a fresh process (nothing opened before): the filter is installed only while a
  checkpointer is open; after a clean run, a corrupt checkpoint and a failed save, the hooks are
  the process's own again, the closed-loop noise never reached them, each error is one line and
  nothing else is printed."""
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  root = Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, "-c", HOOKS_AND_FAILED_SAVE, str(tmp_path)], cwd=root,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHONPATH": str(root)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["open"] and out["closed"] and out["after_corrupt"] and out["after_failed_save"]
  assert out["heard"] == []
  assert "corrupt or truncated" in out["corrupt"] and "\n" not in out["corrupt"]
  assert out["failed_save"].startswith(f"could not save checkpoint {tmp_path / 'full' / '1'}")
  assert "File too large" in out["failed_save"] and "\n" not in out["failed_save"]
  assert f"the last complete checkpoint {tmp_path / 'full' / '0'} is kept" in out["failed_save"]
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr


def test_checkpoints_from_before_the_backbone_fields_count_as_the_mlp():
  """Also inside a sweep's identity (its per-chunk configs), as written before the fields."""
  old = {k: v for k, v in IDENTITY.items() if k not in ("backbone", "width")}
  assert checkpoint.config_diff(old, IDENTITY) == []
  assert checkpoint.config_diff(old, {**IDENTITY, "backbone": "cnn"}) == [
      "backbone (checkpoint: 'mlp', now: 'cnn')"]
  chunk = {"layout": {"num_configs": 2}, "chunk_configs": [old, old]}
  now = {"layout": {"num_configs": 2}, "chunk_configs": [IDENTITY, IDENTITY]}
  assert checkpoint.config_diff(chunk, now) == []
  resnet = {**now, "chunk_configs": [IDENTITY, {**IDENTITY, "backbone": "resnet18"}]}
  assert [d.split(" ")[0] for d in checkpoint.config_diff(chunk, resnet)] == ["chunk_configs"]


# A second backbone for what the default suite checks on the mlp / cnn and on a user's BatchNorm
# module (tests/test_backbones.py): its shared run costs ~45 s of compiling on 2 cores.
@pytest.mark.extended
@pytest.mark.xdist_group("resnet18_run")  # one process builds the shared run
def test_resnet18_batchnorm_run_resumes_bit_identically(resnet18_run):
  """ResNet-18 with BatchNorm: killed mid-epoch of task 2 (its running statistics half-way
  through the task) and resumed from that checkpoint, the rest of the run is the same to the
  bit (accuracies, curves, parameters, running statistics, anchors)."""
  r = resnet18_run
  ckpt = checkpoint.RunCheckpointer(r.folder, r.identity)
  like = continual.abstract_run_state(r.cfg, r.net, r.train)
  assert set(like["train_state"].model_state) == {"batch_stats"}
  mid = next(s for s in range(ckpt.latest_step() + 1)
             if (m := ckpt.read_meta(s))["task"] == 1 and m["epoch"] == 1 and m["step"] > 0)
  rs = ckpt.restore(like, step=mid)
  assert jax.tree.structure(rs.train_state) == jax.tree.structure(like["train_state"])
  resumed = continual.run(r.cfg, r.net, r.train, r.test, resume=rs)
  full = r.result
  np.testing.assert_array_equal(resumed.acc_matrix, full.acc_matrix)
  assert resumed.curves == full.curves
  _assert_tree_equal((resumed.params, resumed.model_state, resumed.memory),
                     (full.params, full.model_state, full.memory))
  ckpt.close()
