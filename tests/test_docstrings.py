"""The doctest examples of the library's public docstrings run and give what they show."""

import doctest
import importlib

import pytest

MODULES = ["ewc_jax.fisher", "ewc_jax.penalty", "ewc_jax.per_example", "ewc_jax.masks",
           "ewc_jax.variables", "ewc_jax.transform", "ewc_jax.holdout", "ewc_jax.task_data",
           "ewc_jax.errors", "ewc_jax.backbones"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0, result
