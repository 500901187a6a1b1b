"""ewc_jax.compiler_options: the CPU options take effect, leave dense programs alone, and an
option or value the installed XLA does not know falls back to its defaults."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ewc_jax import compiler_options

NHWC = ("NHWC", "HWIO", "NHWC")
cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU options")


def _program_text(compiled) -> str:
  """The optimised HLO without metadata (names of source lines differ between traces)."""
  text = re.sub(r", metadata=\{[^}]*\}", "", compiled.as_text())
  return "\n".join(l for l in text.splitlines() if "=" in l and "stack_frame" not in l)


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)


@cpu_only
def test_a_lone_convolution_leaves_ynnpack_and_keeps_its_values():
  x = jax.random.normal(jax.random.key(0), (8, 14, 14, 32))
  w = jax.random.normal(jax.random.key(1), (3, 3, 32, 64))
  lowered = jax.jit(_conv).lower(x, w)
  default, ours = lowered.compile(), compiler_options.compile_program(lowered)
  assert "__ynn_fusion" in default.as_text()      # XLA's default: a one-thread YNNPACK fusion
  assert "__ynn_fusion" not in ours.as_text()     # the options took effect
  np.testing.assert_allclose(ours(x, w), default(x, w), rtol=2e-5, atol=2e-4)


@cpu_only
def test_dense_programs_compile_to_the_same_program():
  def step(w, x):
    loss = lambda w: jnp.mean(jnp.tanh(x @ w[0]) @ w[1])  # noqa: E731
    return jax.grad(loss)(w)
  w = (jnp.ones((784, 400)), jnp.ones((400, 10)))
  lowered = jax.jit(step).lower(w, jnp.ones((128, 784)))
  assert (_program_text(compiler_options.compile_program(lowered))
          == _program_text(lowered.compile()))


def test_options_by_platform():
  assert compiler_options.for_platform("gpu") == {}
  assert compiler_options.for_platform("tpu") == {}
  cpu = compiler_options.for_platform("cpu")
  cpu["x"] = "1"                                   # a copy: the module's stays as it is
  assert "x" not in compiler_options.for_platform("cpu")


@cpu_only
@pytest.mark.parametrize("options", [
    {"xla_cpu_no_such_option_for_this_test": "1"},                   # an option it lacks
    {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"},   # a value it lacks
], ids=["unknown_option", "unknown_value"])
def test_what_xla_does_not_know_compiles_with_its_defaults(monkeypatch, options):
  monkeypatch.setitem(compiler_options._BY_PLATFORM, "cpu", options)
  lowered = jax.jit(lambda x: x - 0.25).lower(jnp.ones(5))
  np.testing.assert_array_equal(compiler_options.compile_program(lowered)(jnp.ones(5)), 0.75)
