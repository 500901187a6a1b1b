"""XLA compiler options for the programs ewc_jax compiles, per platform.

On the CPU (jaxlib 0.10.2), XLA hands a convolution that nothing is fused into to YNNPACK as a
fusion of its own (``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``, one of XLA's three default
YNNPACK fusion types with ``INDIVIDUAL_DOT`` and ``REDUCE``), and that fusion runs on one
thread: the ``cnn`` backbone's second convolution (batch 128, 14x14x32 -> 64, 3x3) took
10.4 ms alone on this project's 2-core CPU, 5.1 ms with a reduction fused into it, and 5.4 ms
through XLA's own (Eigen) convolution. :data:`CPU` keeps the other two default fusion types and
leaves convolutions to XLA. Measured on the ``cnn`` backbone's Split MNIST run at λ = 1000
(docs/performance.md, "The CNN against the peers"): training 51.2 -> 42.9 s from the options
alone. Dense layers compile to the same program either way (the MLP runs are unchanged).

The runner compiles every program with :func:`compile_program`. In your own training loop on the CPU::

    step = jax.jit(train_step, compiler_options=compiler_options.for_platform("cpu"))

(or ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` in the
environment before JAX starts, for every program of the process).

    >>> from ewc_jax import compiler_options
    >>> compiler_options.for_platform("gpu")
    {}
    >>> sorted(compiler_options.for_platform("cpu"))
    ['xla_cpu_experimental_ynn_fusion_type']
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

CPU: Mapping[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}
_BY_PLATFORM: Mapping[str, Mapping[str, str]] = {"cpu": CPU}


def for_platform(platform: str) -> dict[str, str]:
  """The options for programs compiled for ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``, ...):
  a new dict, empty where XLA's defaults are kept."""
  return dict(_BY_PLATFORM.get(platform, {}))


def compile_program(lowered: jax.stages.Lowered, platform: str | None = None) -> Any:
  """``lowered.compile`` with :func:`for_platform`'s options (``platform``: default JAX's
  default backend). A jaxlib that does not know an option (older or newer XLA) compiles with
  XLA's defaults instead: the options change the speed of the program, never its values'
  meaning."""
  options = for_platform(platform or jax.default_backend())
  if not options:
    return lowered.compile()
  try:
    return lowered.compile(compiler_options=options)
  except jax.errors.JaxRuntimeError as e:
    if not any(name in str(e) for name in options):
      raise
    return lowered.compile()
