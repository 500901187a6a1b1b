"""Test-wide settings: no downloads, a private cache, the real data folder when present."""

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_TFDS = ROOT.parent / "shared" / "tensorflow_datasets"


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


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
  """Decoded-data and compile caches of the test session live in a temporary folder."""
  old = os.environ.get("EWC_JAX_CACHE_DIR")
  os.environ["EWC_JAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("ewc_jax_cache"))
  yield
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
