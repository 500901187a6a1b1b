"""Every python code block of README.md and docs/*.md runs as written and gives what the text says.

A python block names its harness in the HTML comment right above it (``<!-- test: NAME -->``,
invisible on GitHub and on the docs site). The blocks of one page with the same harness form one
group, run in page order in one scope: the harness below sets up the names the text leaves to the
reader (``model``, ``params``, ``x_a``, ...; tiny shapes), runs them and checks the text's claims.
A python block that is not meant to run says so the same way (``<!-- test: no-run -->``; a
word after ``python`` in the fence would stop Python-Markdown from rendering it as code); shell
and text blocks are not run. A python block with neither is refused, as is a marker naming no
harness.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ewc_jax import ewc_loss
from ewc_jax import fisher_diagonal

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
PYTHON = {"python", "py", "python3"}
FENCE = re.compile(r"^(`{3,}|~{3,})[ \t]*([^\s`{]*)")
MARKER = re.compile(r"^<!--\s*test:\s*([\w-]+)\s*-->$")


class Block(NamedTuple):
  page: str
  line: int
  harness: str | None      # None: not run (marked no-run, or not python)
  code: str


def blocks_of(path: Path) -> list[Block]:
  """The fenced code blocks of a markdown file, python ones with their harness."""
  name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
  lines = path.read_text().splitlines()
  out, i = [], 0
  while i < len(lines):
    m = FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    fence, lang = m.group(1), m.group(2).lower()
    end = i + 1
    while end < len(lines) and not lines[end].startswith(fence):
      end += 1
    code = "\n".join(lines[i + 1:end]) + "\n"
    harness = None
    if lang in PYTHON:
      prev = i - 1
      while prev >= 0 and not lines[prev].strip():
        prev -= 1
      marker = MARKER.match(lines[prev].strip()) if prev >= 0 else None
      if marker is None:
        raise AssertionError(f"{name}:{i + 1}: a python block without a "
                             "`<!-- test: NAME -->` line above it (NAME: a harness, or no-run)")
      harness = None if marker.group(1) == "no-run" else marker.group(1)
    out.append(Block(name, i + 1, harness, code))
    i = end + 1
  return out


def groups() -> dict[tuple[str, str], list[Block]]:
  found: dict[tuple[str, str], list[Block]] = {}
  for page in PAGES:
    for b in blocks_of(page):
      if b.harness is not None:
        found.setdefault((b.page, b.harness), []).append(b)
  return found


def run_block(block: Block, scope: dict) -> dict:
  exec(compile(block.code, f"{block.page}:{block.line}", "exec"), scope)  # pylint: disable=exec-used
  return scope


# ------------------------------------------------------------------------------------------------
# The harnesses: set up, run the group's blocks, check.

def _task(seed=1, n=32):
  x = jax.random.normal(jax.random.key(seed), (n, 4))
  return x, jnp.argmax(x[:, :3], axis=-1)


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def harness_linen(blocks, request):
  """The linen example (README and library guide), then (library guide) the optax transformation
  in the same scope: its gradient part equals that of task loss + ewc_loss."""
  del request
  assert len(blocks) in (1, 2) and "model.apply" in blocks[0].code
  model = Model()
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  x_a, y_a = _task()
  scope = run_block(blocks[0], {"model": model, "params": params, "tx": optax.adam(1e-2),
                                "x_a": x_a, "y_a": y_a})
  tx = scope["tx"]
  opt_state, p = tx.init(params), params
  for _ in range(3):
    p, opt_state, loss = scope["train_step"](p, opt_state, x_a, y_a, scope["anchors"])
  assert np.isfinite(float(loss))
  assert not np.allclose(jax.tree.leaves(p)[0], jax.tree.leaves(params)[0])
  if len(blocks) == 1:
    return
  assert "add_ewc_gradient" in blocks[1].code
  x_b, y_b = _task(seed=2)
  scope.update({"x_b": x_b, "y_b": y_b})
  run_block(blocks[1], scope)
  assert jax.tree.structure(scope["params"]) == jax.tree.structure(params)
  moved = jax.tree.map(lambda v: v + 0.05, params)
  task_loss = scope["task_loss"]
  add = scope["add_ewc_gradient"](scope["anchors"], lam=1000.0)
  got, _ = add.update(jax.grad(task_loss)(moved), add.init(moved), moved)
  want = jax.grad(lambda q: task_loss(q) + ewc_loss(q, scope["anchors"], lam=1000.0))(moved)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert max(float(np.max(np.abs(b))) for b in jax.tree.leaves(want)) > 1e-3


class NnxModel(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def harness_nnx(blocks, request):
  """The NNX example trains, and the anchor stays frozen while the model moves."""
  del request
  (block,) = blocks
  assert "nnx.split" in block.code
  model = NnxModel(nnx.Rngs(0))
  x_a, y_a = _task()
  scope = run_block(block, {"model": model, "x_a": x_a, "y_a": y_a})
  frozen = [np.array(v) for v in jax.tree.leaves(scope["anchors"][0].params)]
  x_b, y_b = _task(seed=2)
  for _ in range(3):
    loss = scope["train_step"](model, scope["optimizer"], x_b, y_b, scope["anchors"])
  assert np.isfinite(float(loss))
  now = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert not np.allclose(now[0], frozen[0])
  for a, b in zip(jax.tree.leaves(scope["anchors"][0].params), frozen):
    np.testing.assert_array_equal(a, b)


class BNModel(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(3, name="head")(x)


def harness_batchnorm(blocks, request):
  """BatchNorm + dropout + a leaf mask: the shared params (BatchNorm's scale and bias too) are
  consolidated, not the head; the Fisher is in evaluation mode; the running statistics keep
  moving."""
  del request
  (block,) = blocks
  assert "batch_stats" in block.code and "leaf_mask" in block.code
  model = BNModel()
  x_a, y_a = _task()
  variables = model.init(jax.random.key(0), x_a[:2], train=False)
  tx = optax.adam(1e-2)
  scope = run_block(block, {"model": model, "variables": variables, "tx": tx,
                            "x_a": x_a, "y_a": y_a})
  F = scope["F"]
  assert set(F) == {"Dense_0", "BatchNorm_0", "head"}
  assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(F["head"]))
  assert all(np.max(np.asarray(v)) > 0 for v in jax.tree.leaves(F["BatchNorm_0"]))
  again = scope["fisher_diagonal"](scope["eval_logits"], variables["params"], x_a, y_a,
                                   leaf_mask=scope["shared"])
  for a, b in zip(jax.tree.leaves(F), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  x_b, y_b = _task(seed=2)
  p, stats, opt_state = variables["params"], variables["batch_stats"], tx.init(variables["params"])
  for i in range(3):
    p, stats, opt_state, loss = scope["train_step"](p, stats, opt_state, x_b, y_b,
                                                    scope["anchors"], jax.random.key(i))
  assert np.isfinite(float(loss))
  assert not np.allclose(stats["BatchNorm_0"]["mean"],
                         variables["batch_stats"]["BatchNorm_0"]["mean"])
  moved = {**variables["params"],
           "head": jax.tree.map(lambda v: v + 1.0, variables["params"]["head"])}
  assert float(scope["ewc_loss"](moved, scope["anchors"], lam=1.0, leaf_mask=scope["shared"])) == 0


class _LM(nnx.Module):
  def __init__(self, vocab, d, length, rngs):
    self.tok = nnx.Embed(vocab, d, rngs=rngs)
    self.pos = nnx.Param(0.1 * jax.random.normal(rngs.params(), (length, d)))
    self.ln = nnx.LayerNorm(d, rngs=rngs)
    self.att = nnx.MultiHeadAttention(num_heads=2, in_features=d, qkv_features=d, decode=False,
                                      rngs=rngs)
    self.out = nnx.Linear(d, vocab, rngs=rngs)

  def __call__(self, tokens):
    t = tokens.shape[1]
    h = self.tok(tokens) + self.pos[:t]
    causal = nnx.make_causal_mask(tokens)
    h = h + self.att(self.ln(h), mask=causal)
    return self.out(h)


def harness_lm(blocks, request):
  """The token-level, streaming and any-likelihood blocks, on a tiny NNX causal LM: the streamed
  and accumulated Fishers equal the in-memory one, the others are finite and not all zero."""
  del request
  assert len(blocks) == 4
  rng = np.random.default_rng(0)
  lm = _LM(13, 8, 6, nnx.Rngs(0))
  lm.eval()
  tokens = jnp.asarray(rng.integers(0, 13, (24, 6)), jnp.int32)
  mask = jnp.ones((24, 6)).at[::3, 4:].set(0.0)          # padded rows
  scope = {"lm": lm, "tokens": tokens, "mask": mask,
           "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
           "xs": jnp.asarray(rng.normal(size=(10, 3)), jnp.float32),
           "ys": jnp.asarray(rng.normal(size=(10, 4)), jnp.float32),
           "actions": jnp.asarray(rng.integers(0, 4, 10), jnp.int32)}
  for block in blocks:
    run_block(block, scope)
  whole = fisher_diagonal(scope["logits_fn"], scope["params"], scope["inputs"][:24],
                          scope["targets"][:24], label_mask=mask[:24, 1:])
  for a, b, c in zip(jax.tree.leaves(scope["F_stream"]), jax.tree.leaves(scope["F_acc"]),
                     jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-9)
  for name in ("F", "F_reg", "F_policy"):
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(scope[name]))
    assert max(float(np.max(x)) for x in jax.tree.leaves(scope[name])) > 0


def harness_backbone(blocks, request):
  """Your own linen module with BatchNorm and dropout in the continual runner, on tiny image
  tasks: it runs every task, and the final running statistics come back."""
  del request
  from tests.runs import T, image_tasks  # pylint: disable=import-outside-toplevel
  (block,) = blocks
  scope = run_block(block, {"train": image_tasks(40, 0), "test": image_tasks(20, 1)})
  result = scope["result"]
  assert result.acc_matrix.shape == (T, T) and set(result.model_state) == {"batch_stats"}


def harness_config(blocks, request):
  """An experiment from Python (shrunk: tiny MNIST, one short epoch): it writes results.json with
  the experiment's settings and prints the average accuracy it stored."""
  from experiments import config  # pylint: disable=import-outside-toplevel
  (block,) = blocks
  tmp_path = request.getfixturevalue("tmp_path")
  data_dir = request.getfixturevalue("tiny_mnist_dir")
  monkeypatch = request.getfixturevalue("monkeypatch")
  capsys = request.getfixturevalue("capsys")
  make = config.make
  monkeypatch.setattr(config, "make", lambda *a, **k: make(
      *a, **k, max_examples=200, epochs=1, hidden=(8,), batch_size=32, plots=False,
      progress=False, data_dir=data_dir))
  assert '"runs/from_python"' in block.code
  run_block(block._replace(code=block.code.replace('"runs/from_python"', repr(str(tmp_path)))), {})
  record = json.loads((tmp_path / "results.json").read_text())
  assert record["experiment"]["seeds"] == [0, 1] and len(record["acc_matrix"]) == 3
  assert f"{record['average_accuracy_mean']}" in capsys.readouterr().out


HARNESSES = {"linen": harness_linen, "nnx": harness_nnx, "batchnorm": harness_batchnorm,
             "lm": harness_lm, "backbone": harness_backbone, "config": harness_config}
GROUPS = groups()


def test_every_python_block_has_a_harness_and_every_harness_is_used():
  used = {name for _, name in GROUPS}
  assert used <= set(HARNESSES), f"markers naming no harness: {sorted(used - set(HARNESSES))}"
  assert set(HARNESSES) <= used, f"harnesses no block uses: {sorted(set(HARNESSES) - used)}"
  # The README keeps its library example; the library guide has every example.
  assert ("README.md", "linen") in GROUPS
  assert {name for page, name in GROUPS if page == "docs/library.md"} >= {
      "linen", "nnx", "batchnorm", "lm", "backbone"}


@pytest.mark.parametrize("page,name", sorted(GROUPS), ids=[f"{p}:{n}" for p, n in sorted(GROUPS)])
def test_docs_code_blocks_run(page, name, request):
  HARNESSES[name](GROUPS[page, name], request)


def test_block_parser_refuses_an_unmarked_python_block_and_skips_no_run_and_shell(tmp_path):
  page = tmp_path / "page.md"
  page.write_text("text\n\n<!-- test: no-run -->\n```python\nraise SystemExit\n```\n\n"
                  "```sh\nexit 1\n```\n\n"
                  "<!-- test: lm -->\n\n```python\nx = 1\n```\n")
  got = [(b.harness, b.code) for b in blocks_of(page)]
  assert got == [(None, "raise SystemExit\n"), (None, "exit 1\n"), ("lm", "x = 1\n")]
  page.write_text("```python\nx = 1\n```\n")
  with pytest.raises(AssertionError, match="python block without"):
    blocks_of(page)
