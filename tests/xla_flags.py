"""The XLA flags of the test processes (conftest sets them in the environment) plus a test's own:
a subprocess that needs forced host devices keeps the suite's cheap code generation."""

import os


def with_xla_flags(*flags: str) -> str:
  """``$XLA_FLAGS`` (conftest's) followed by ``flags``, as one ``XLA_FLAGS`` value."""
  return " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), *flags]))
