"""The doctest examples of the library's public docstrings run and give what they show (every
module of ``ewc_jax``; those listed in WITH_EXAMPLES must have some)."""

import doctest
import importlib
import pkgutil

import pytest

import ewc_jax

WITH_EXAMPLES = {"ewc_jax.compiler_options", "ewc_jax.fisher", "ewc_jax.fisher_stream", "ewc_jax.penalty", "ewc_jax.per_example", "ewc_jax.masks",
                 "ewc_jax.variables", "ewc_jax.transform", "ewc_jax.continual.holdout",
                 "ewc_jax.continual.task_data", "ewc_jax.errors", "ewc_jax.backbones",
                 "ewc_jax.initializers", "ewc_jax.interrupt"}
MODULES = sorted(m.name for m in pkgutil.walk_packages(ewc_jax.__path__, "ewc_jax."))


def test_every_listed_module_exists():
  assert WITH_EXAMPLES <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.failed == 0, result
  if name in WITH_EXAMPLES:
    assert result.attempted > 0, result
