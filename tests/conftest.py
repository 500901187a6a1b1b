"""Test-wide settings: no downloads, a private cache, the real data folder when present."""

import os
import pathlib

import pytest

from tests.xla_flags import with_xla_flags

# XLA's code generation at its cheapest for the test processes and the command lines they start
# (inherited through the environment; set before any backend starts): most of the suite's time
# is compiling small programs, and nothing the tests check depends on LLVM's optimisation (the
# suite: 568 -> 500 s on 2 cores, 1,129 -> 963 s of CPU). Subprocesses that set flags of their
# own add them to these (tests/xla_flags.py).
os.environ["XLA_FLAGS"] = with_xla_flags("--xla_backend_optimization_level=0",
                                         "--xla_llvm_disable_expensive_passes=true")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_TFDS = ROOT.parent / "shared" / "tensorflow_datasets"


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
  """Tests that share a module-scoped fixture of their module (a run they all read) go to one
  worker under ``--dist loadgroup``, so that it is built once, not once per worker; a test's
  own ``xdist_group`` wins."""
  for item in items:
    if item.get_closest_marker("xdist_group") is not None:
      continue
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(info, "names_closure", ()):
      defs = info.name2fixturedefs.get(name)
      if defs and defs[-1].scope == "module":
        item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}.{name}"))
        break


@pytest.fixture(scope="session")
def real_data_dir():
  """The prepared MNIST beside the checkout (read-only); skips when it is not there."""
  if not (SHARED_TFDS / "mnist").is_dir():
    pytest.skip(f"real MNIST not found at {SHARED_TFDS}")
  return str(SHARED_TFDS)


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory):
  """A tiny MNIST (28x28x1, 10 classes; 2,000 train and 500 test images drawn around one
  prototype per class) prepared for TFDS in a temporary folder: the end-to-end tests (CLI,
  fuzz, kill-and-resume, sweeps) run on it with nothing beside the checkout."""
  import tiny_tfds  # pylint: disable=import-outside-toplevel
  folder = tmp_path_factory.mktemp("tiny_tfds")
  tiny_tfds.write_dataset(folder, "mnist", {"train": 2000, "test": 500}, seed=0, learnable=True)
  return str(folder)


@pytest.fixture(scope="session")
def resnet18_run(tmp_path_factory):
  """A resnet18 (BatchNorm) EWC run on tiny 8x8x3 image tasks, checkpointed after every chunk,
  its compilations counted; shared by the compile-count, resume and BatchNorm tests (compiling
  its programs is what costs)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from types import SimpleNamespace  # pylint: disable=import-outside-toplevel

  from ewc_jax import checkpoint, continual  # pylint: disable=import-outside-toplevel
  from tests import runs  # pylint: disable=import-outside-toplevel
  cfg = continual.Config(backbone="resnet18", epochs=2, batch_size=16, lam=10.0, lr=1e-2,
                         chunk_steps=2, fisher_batch_size=16, seed=3)
  net = continual.make_network(cfg, [[0, 1]] * runs.T)
  train, test = runs.image_tasks(40, 0), runs.image_tasks(20, 1)
  folder = tmp_path_factory.mktemp("resnet18") / "ck"
  identity = {"benchmark": "tiny images", **dataclasses.asdict(cfg)}
  with checkpoint.RunCheckpointer(folder, identity, keep=1000, every=1,
                                  chunk_steps=cfg.chunk_steps) as ckpt:
    result, compiled, late = runs.run_counting_compiles(cfg, net, train, test,
                                                        on_checkpoint=ckpt)
  return SimpleNamespace(cfg=cfg, net=net, train=train, test=test, result=result,
                         compiled=compiled, late_compiles=late, folder=folder,
                         identity=identity)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
  """Decoded-data and compile caches of the test session live in a temporary folder.

  JAX's persistent compilation cache is on for the test process too, in the folder the CLI
  runs of the tests use (``$EWC_JAX_CACHE_DIR/xla``, as ``experiments.compile_cache``): the
  many tests that run one program twice (a run and its resumed copy, a sweep and its single
  runs) compile it once. The compile-count tests count tracing as well, so a cache hit cannot
  hide a re-traced program."""
  import jax  # pylint: disable=import-outside-toplevel
  old = os.environ.get("EWC_JAX_CACHE_DIR")
  folder = tmp_path_factory.mktemp("ewc_jax_cache")
  os.environ["EWC_JAX_CACHE_DIR"] = str(folder)
  settings = {"jax_compilation_cache_dir": str(folder / "xla"),
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  before = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  yield
  for name, value in before.items():
    jax.config.update(name, value)
  if old is None:
    os.environ.pop("EWC_JAX_CACHE_DIR", None)
  else:
    os.environ["EWC_JAX_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_cifar_dir(tmp_path_factory):
  """Tiny CIFAR-10 and CIFAR-100 (32x32x3; 10 / 100 classes around one prototype each; 500 and
  1,000 train, 200 test images) prepared for TFDS: Split CIFAR's whole path without a
  download."""
  import tiny_tfds  # pylint: disable=import-outside-toplevel
  folder = tmp_path_factory.mktemp("tiny_cifar")
  tiny_tfds.write_dataset(folder, "cifar10", {"train": 500, "test": 200}, seed=1, learnable=True)
  tiny_tfds.write_dataset(folder, "cifar100", {"train": 1000, "test": 200}, seed=2,
                          learnable=True)
  return str(folder)
