"""The code blocks of docs/library.md run as written, in order, in one scope (set up here with a
tiny NNX causal language model and small regression/policy data), and give what the text says."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ewc_jax import fisher_diagonal

DOC = Path(__file__).resolve().parents[1] / "docs" / "library.md"


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


def _blocks():
  return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_docs_library_examples_run():
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
  blocks = _blocks()
  assert len(blocks) == 4
  for code in blocks:
    exec(compile(code, str(DOC), "exec"), scope)  # pylint: disable=exec-used
  whole = fisher_diagonal(scope["logits_fn"], scope["params"], scope["inputs"][:24],
                          scope["targets"][:24], label_mask=mask[:24, 1:])
  for a, b, c in zip(jax.tree.leaves(scope["F_stream"]), jax.tree.leaves(scope["F_acc"]),
                     jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(b, c, rtol=1e-5, atol=1e-9)
  for name in ("F", "F_reg", "F_policy"):
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(scope[name]))
    assert max(float(np.max(x)) for x in jax.tree.leaves(scope[name])) > 0
