"""The suite's own machinery: tests sharing a costly session fixture run in one process."""

import pytest


@pytest.mark.xdist_group("suite_setup_probe")
def test_xdist_groups_reach_the_scheduler(request):
  """Under ``--dist loadgroup`` (the README's ``make test``) a grouped test's id carries its
  group, which is what sends the group to one worker; a pytest / pytest-xdist pair that drops it
  would build every shared fixture (e.g. ``resnet18_run``) once per worker."""
  if not getattr(request.config.option, "loadgroup", False):
    pytest.skip("not run under pytest-xdist's --dist loadgroup")
  assert request.node.nodeid.endswith("@suite_setup_probe"), request.node.nodeid


@pytest.fixture(scope="module")
def shared_by_the_module():
  return object()


def test_a_module_fixture_groups_its_tests(request, shared_by_the_module):
  """conftest's rule: tests reading a module-scoped fixture of their module share a group (one
  worker builds it once)."""
  del shared_by_the_module
  if not getattr(request.config.option, "loadgroup", False):
    pytest.skip("not run under pytest-xdist's --dist loadgroup")
  group = f"@{request.module.__name__}.shared_by_the_module"
  assert request.node.nodeid.endswith(group), request.node.nodeid
