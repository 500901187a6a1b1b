"""Tests for experiments.data: real TFDS array_record reading, cache, user errors.

`tfds.testing.mock_data` cannot drive this loader without TensorFlow (TFDS 4.9.10):
with `decoders=` its fake generator encodes images with TensorFlow, and its mocked
`__getitems__` is an unbound `functools.partial` that fails with a TypeError. So
the tests write tiny *real* prepared datasets ('mnist', 'fashion_mnist') into a
temp folder (PNG bytes from Pillow, serialized by the builder's own features,
written with array_record, metadata by `DatasetInfo.write_to_directory`) and read
them back through `tfds.data_source`. Nothing is downloaded.

The index fast path is checked in fresh subprocesses (that a repeated load does not
import `tensorflow_datasets`) and in-process by making `data._tfds` fail (any use of
TFDS, i.e. the normal path, then raises).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

import tiny_tfds
from experiments import data
from experiments.data import DataError, load_dataset

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = (Path(__file__).parents[1] / ".." / "shared" / "tensorflow_datasets").resolve()
TINY_SIZES = {"train": 12, "test": 5}


def _write_tiny_dataset(
  data_dir: Path, name: str, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Writes a small prepared array_record TFDS dataset (noise); returns the arrays written."""
  return tiny_tfds.write_dataset(data_dir, name, TINY_SIZES, seed)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
  data_dir = tmp_path_factory.mktemp("tfds_data")
  written = {
    name: _write_tiny_dataset(data_dir, name, seed)
    for seed, name in enumerate(["mnist", "fashion_mnist"])
  }
  return data_dir, written


def _listing(folder: Path) -> list[str]:
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _arrays(ds: data.Dataset) -> list[np.ndarray]:
  return list(ds[:4])


def _assert_same_arrays(got: list[np.ndarray], want: list[np.ndarray]) -> None:
  assert len(got) == len(want) == 4
  for a, b in zip(got, want):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def _python_json(code: str):
  """Runs ``code`` in a new Python process (the checkout importable); returns the finished
  process and the JSON of its last stdout line."""
  env = dict(os.environ, PYTHONPATH=os.fspath(ROOT))
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr
  return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def _fresh_load(name: str, data_dir: Path, cache_dir: Path) -> dict:
  """`load_dataset` in a new Python process: from_cache, whether TFDS got imported, arrays."""
  code = (
    "import json, sys\n"
    "from experiments.data import load_dataset\n"
    f"ds = load_dataset({name!r}, data_dir={os.fspath(data_dir)!r}, "
    f"cache_dir={os.fspath(cache_dir)!r}, download=False)\n"
    "print(json.dumps({'from_cache': ds.from_cache, "
    "'tfds_imported': 'tensorflow_datasets' in sys.modules, "
    "'pil_imported': 'PIL' in sys.modules, 'name': ds.name, 'version': ds.version, "
    "'arrays': [[a.dtype.str, list(a.shape), a.tolist()] for a in ds[:4]]}))\n"
  )
  proc, out = _python_json(code)
  out["arrays"] = [
    np.asarray(values, np.dtype(dt)).reshape(shape) for dt, shape, values in out["arrays"]
  ]
  return out


@pytest.fixture
def no_tfds(monkeypatch):
  """Makes every use of TFDS (the normal, slow path) fail: only the index may answer."""

  def fail():
    raise AssertionError("load_dataset took the TFDS path; expected the index fast path")

  monkeypatch.setattr(data, "_tfds", fail)


def _cache_files(cache_dir: Path) -> list[str]:
  return sorted(p.name for p in (cache_dir / "datasets").iterdir())


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_load_tiny_dataset_decodes_exactly(tiny_data, tmp_path, name):
  data_dir, written = tiny_data
  before = _listing(data_dir)
  ds = load_dataset(name, data_dir=data_dir, cache_dir=tmp_path, download=False)
  assert ds.name == name and ds.version == "3.0.1" and not ds.from_cache
  for images, labels, split in [
    (ds.train_images, ds.train_labels, "train"),
    (ds.test_images, ds.test_labels, "test"),
  ]:
    assert images.dtype == np.uint8 and images.shape == (TINY_SIZES[split], 28, 28, 1)
    assert labels.dtype == np.int32 and labels.shape == (TINY_SIZES[split],)
    np.testing.assert_array_equal(images, written[name][split][0])
    np.testing.assert_array_equal(labels, written[name][split][1])
  assert _listing(data_dir) == before  # the data folder is never written to
  files = _cache_files(tmp_path)
  assert len(files) == 5, files
  for split in ("test", "train"):
    for part in ("images", "labels"):
      assert (
        sum(f.startswith(f"{name}-3.0.1-{split}-") and f.endswith(f".{part}.npy") for f in files)
        == 1
      )
  assert sum(f.startswith(f"{name}-") and f.endswith(".index.json") for f in files) == 1


def test_cache_hit_and_corrupt_cache_recovery(tiny_data, tmp_path):
  data_dir, _ = tiny_data
  first = load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path)
  second = load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path)
  assert not first.from_cache and second.from_cache
  assert second.load_seconds < 1.0
  for a, b in zip(first[:4], second[:4]):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype

  (cache_file,) = (tmp_path / "datasets").glob("mnist-3.0.1-train-*.images.npy")
  cache_file.write_bytes(b"not an npy file")
  third = load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path)
  assert not third.from_cache
  np.testing.assert_array_equal(third.train_images, first.train_images)
  np.testing.assert_array_equal(third.train_labels, first.train_labels)
  np.testing.assert_array_equal(
    np.load(cache_file), first.train_images
  )  # overwritten with a valid file
  assert load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path).from_cache
  assert not [p for p in (tmp_path / "datasets").iterdir() if p.suffix == ".tmp"]


def test_repeated_load_skips_tfds_in_a_fresh_process(tiny_data, tmp_path):
  data_dir, written = tiny_data
  first = load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path, download=False)
  assert not first.from_cache
  second = load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path, download=False)
  assert second.from_cache and (second.name, second.version) == ("mnist", "3.0.1")
  _assert_same_arrays(_arrays(second), _arrays(first))
  assert not second.train_images.flags.writeable  # a read-only map of the cache file

  fresh = _fresh_load("mnist", data_dir, tmp_path)
  assert fresh["from_cache"] and not fresh["tfds_imported"] and not fresh["pil_imported"]
  assert (fresh["name"], fresh["version"]) == ("mnist", "3.0.1")
  _assert_same_arrays(fresh["arrays"], _arrays(first))
  np.testing.assert_array_equal(fresh["arrays"][0], written["mnist"]["train"][0])


def test_data_tfds_is_still_available():
  assert data.tfds is tfds
  with pytest.raises(AttributeError):
    data.no_such_attribute  # noqa: B018


def test_changed_prepared_folder_takes_the_slow_path(tmp_path, monkeypatch):
  data_dir, cache_dir = tmp_path / "data", tmp_path / "cache"
  written = _write_tiny_dataset(data_dir, "mnist", seed=7)
  first = load_dataset("mnist", data_dir=data_dir, cache_dir=cache_dir, download=False)
  assert not first.from_cache
  assert not _fresh_load("mnist", data_dir, cache_dir)["tfds_imported"]  # the index answers

  info = data_dir / "mnist" / "3.0.1" / "dataset_info.json"
  stat = info.stat()
  info.write_text(info.read_text())  # same bytes, new mtime
  os.utime(info, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
  fresh = _fresh_load("mnist", data_dir, cache_dir)
  assert fresh["tfds_imported"]  # the normal path: TFDS opened the dataset again ...
  assert fresh["from_cache"]  # ... and read the cached arrays (no decoding)
  _assert_same_arrays(fresh["arrays"], _arrays(first))
  again = _fresh_load("mnist", data_dir, cache_dir)  # the entry was rewritten
  assert again["from_cache"] and not again["tfds_imported"]

  (data_dir / "mnist" / "3.0.2").mkdir()  # a new version folder beside the prepared one
  assert _fresh_load("mnist", data_dir, cache_dir)["tfds_imported"]
  (data_dir / "mnist" / "3.0.2").rmdir()
  assert _fresh_load("mnist", data_dir, cache_dir)["tfds_imported"]
  assert not _fresh_load("mnist", data_dir, cache_dir)["tfds_imported"]

  # A changed array_record file (same size, new mtime) is seen too (spy instead of a process).
  record = next((data_dir / "mnist" / "3.0.1").glob("mnist-train.array_record*"))
  st = record.stat()
  os.utime(record, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
  calls = []
  real_tfds = data._tfds
  monkeypatch.setattr(data, "_tfds", lambda: calls.append(1) or real_tfds())
  third = load_dataset("mnist", data_dir=data_dir, cache_dir=cache_dir, download=False)
  assert calls and third.from_cache
  np.testing.assert_array_equal(third.train_images, written["train"][0])
  calls.clear()
  assert load_dataset("mnist", data_dir=data_dir, cache_dir=cache_dir, download=False).from_cache
  assert not calls

  # The prepared folder gone: the entry no longer holds and the usual error is raised.
  for path in sorted((data_dir / "mnist" / "3.0.1").iterdir()):
    path.unlink()
  with pytest.raises(DataError, match="not prepared"):
    load_dataset("mnist", data_dir=data_dir, cache_dir=cache_dir, download=False)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "labels", "delete", "index"])
def test_damaged_cache_falls_back_to_decoding(tiny_data, tmp_path, damage):
  data_dir, written = tiny_data
  load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path, download=False)
  folder = tmp_path / "datasets"
  (images,) = folder.glob("mnist-3.0.1-train-*.images.npy")
  (labels,) = folder.glob("mnist-3.0.1-train-*.labels.npy")
  (index,) = folder.glob("mnist-*.index.json")
  if damage == "garbage":
    images.write_bytes(b"\x93NUMPY garbage")
  elif damage == "truncate":
    images.write_bytes(images.read_bytes()[:-100])
  elif damage == "labels":  # a valid .npy of the wrong length
    np.save(labels, np.zeros(3, np.int32))
  elif damage == "delete":
    images.unlink()
  else:
    index.write_text("{not json")
  ds = load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path, download=False)
  assert ds.from_cache == (damage == "index")  # a lost index re-reads the intact arrays
  np.testing.assert_array_equal(ds.train_images, written["mnist"]["train"][0])
  np.testing.assert_array_equal(ds.train_labels, written["mnist"]["train"][1])
  np.testing.assert_array_equal(np.load(images), written["mnist"]["train"][0])  # rewritten
  np.testing.assert_array_equal(np.load(labels), written["mnist"]["train"][1])
  json.loads(index.read_text())
  fresh = _fresh_load("mnist", data_dir, tmp_path)
  assert fresh["from_cache"] and not fresh["tfds_imported"]
  _assert_same_arrays(fresh["arrays"], _arrays(ds))


def test_old_npz_cache_is_ignored(tiny_data, tmp_path):
  data_dir, written = tiny_data
  (tmp_path / "datasets").mkdir()
  np.savez(
    tmp_path / "datasets" / "mnist-3.0.1-train.npz",
    images=np.zeros((12, 28, 28, 1), np.uint8),
    labels=np.zeros(12, np.int32),
  )
  ds = load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path, download=False)
  assert not ds.from_cache
  np.testing.assert_array_equal(ds.train_images, written["mnist"]["train"][0])


def test_index_entries_are_not_shared_between_requests(tmp_path, no_tfds, monkeypatch):
  # Two data folders holding the same dataset version and sizes, with different pixels.
  dir_a, dir_b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
  with monkeypatch.context() as m:
    m.setattr(data, "_tfds", lambda: tfds)  # the first loads need TFDS
    written_a = _write_tiny_dataset(dir_a, "mnist", seed=11)
    written_b = _write_tiny_dataset(dir_b, "mnist", seed=12)
    written_f = _write_tiny_dataset(dir_a, "fashion_mnist", seed=13)
    loads = {
      ("mnist", dir_a): load_dataset("mnist", data_dir=dir_a, cache_dir=cache, download=False),
      ("mnist", dir_b): load_dataset("mnist", data_dir=dir_b, cache_dir=cache, download=False),
      ("fashion_mnist", dir_a): load_dataset(
        "fashion_mnist", data_dir=dir_a, cache_dir=cache, download=False
      ),
      ("mnist:3.0.1", dir_a): load_dataset(
        "mnist:3.0.1", data_dir=dir_a, cache_dir=cache, download=False
      ),
    }
    assert not any(ds.from_cache for ds in list(loads.values())[:3])
    assert loads[("mnist:3.0.1", dir_a)].from_cache  # same arrays as 'mnist', own entry
  expected = {
    ("mnist", dir_a): written_a,
    ("mnist", dir_b): written_b,
    ("fashion_mnist", dir_a): written_f,
    ("mnist:3.0.1", dir_a): written_a,
  }
  assert len([f for f in _cache_files(cache) if f.endswith(".index.json")]) == 4
  for (name, folder), written in expected.items():  # all answered by the index (no TFDS)
    ds = load_dataset(name, data_dir=folder, cache_dir=cache, download=False)
    assert ds.from_cache and ds.name == name.split(":")[0] and ds.version == "3.0.1"
    for split, images, labels in [
      ("train", ds.train_images, ds.train_labels),
      ("test", ds.test_images, ds.test_labels),
    ]:
      np.testing.assert_array_equal(images, written[split][0])
      np.testing.assert_array_equal(labels, written[split][1])
  # The same folder spelled another way (relative) is the same request.
  monkeypatch.chdir(tmp_path)
  assert load_dataset("mnist", data_dir="b", cache_dir=cache).from_cache
  # Another cache folder has no entry: the normal path.
  with pytest.raises(AssertionError, match="TFDS path"):
    load_dataset("mnist", data_dir=dir_a, cache_dir=tmp_path / "other_cache")


def test_checks_come_before_the_index(tiny_data, tmp_path, no_tfds):
  data_dir, _ = tiny_data
  with pytest.raises(DataError, match="is not valid"):
    load_dataset(" ", data_dir=data_dir, cache_dir=tmp_path)
  with pytest.raises(DataError, match="cache_dir"):
    load_dataset("mnist", data_dir=data_dir, cache_dir=data_dir / "cache", download=False)
  with pytest.raises(DataError, match="does not exist"):
    load_dataset("mnist", data_dir=tmp_path / "nope", cache_dir=tmp_path, download=False)


def test_missing_data_dir_without_download(tmp_path):
  with pytest.raises(DataError, match="data_dir") as info:
    load_dataset("mnist", data_dir=tmp_path / "nope", cache_dir=tmp_path / "cache", download=False)
  assert "TFDS_DATA_DIR" in str(info.value)


def test_unprepared_dataset_without_download(tmp_path):
  (tmp_path / "data").mkdir()
  with pytest.raises(DataError, match="not prepared") as info:
    load_dataset("mnist", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", download=False)
  assert "data_dir" in str(info.value) and "TFDS_DATA_DIR" in str(info.value)


@pytest.mark.skipif(
  importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed"
)
def test_prepare_without_tensorflow_says_how_to_fix(tmp_path):
  (tmp_path / "manual").mkdir()
  with pytest.raises(DataError, match="make prepare-data"):
    load_dataset(
      "mnist",
      data_dir=tmp_path / "data",
      cache_dir=tmp_path / "cache",
      manual_dir=tmp_path / "manual",
    )


def test_unknown_dataset(tmp_path):
  with pytest.raises(DataError, match="dataset 'no_such_dataset_xyz'"):
    load_dataset("no_such_dataset_xyz", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
  assert not (tmp_path / "data").exists()  # failed before any download


def test_non_image_dataset(tmp_path):
  with pytest.raises(DataError, match="not an image-classification dataset"):
    load_dataset("imdb_reviews", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
  assert not (tmp_path / "data").exists()  # failed before any download


def test_cache_dir_inside_data_dir_is_refused(tiny_data):
  data_dir, _ = tiny_data
  with pytest.raises(DataError, match="cache_dir"):
    load_dataset("mnist", data_dir=data_dir, cache_dir=data_dir / "cache", download=False)


def test_default_dirs(monkeypatch, tmp_path):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  assert data.default_data_dir() == str(tmp_path / "tfds")
  monkeypatch.delenv("TFDS_DATA_DIR")
  expected = str(SHARED_DATA_DIR) if SHARED_DATA_DIR.is_dir() else None
  assert data.default_data_dir() == expected

  monkeypatch.setenv("EWC_JAX_CACHE_DIR", str(tmp_path / "c1"))
  assert data.default_cache_dir() == tmp_path / "c1"
  monkeypatch.delenv("EWC_JAX_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert data.default_cache_dir() == tmp_path / "xdg" / "ewc_jax"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert data.default_cache_dir() == tmp_path / "home" / ".cache" / "ewc_jax"


# --- real prepared MNIST (60k + 10k PNGs): decoded once for the whole module ---

needs_shared = pytest.mark.skipif(
  not (SHARED_DATA_DIR / "mnist").is_dir(),
  reason=f"prepared MNIST not found at {SHARED_DATA_DIR} (shared TFDS data folder missing)",
)


@pytest.fixture(scope="module")
def real_mnist(tmp_path_factory: pytest.TempPathFactory):
  cache_dir = tmp_path_factory.mktemp("cache")
  return load_dataset(
    "mnist", data_dir=SHARED_DATA_DIR, cache_dir=cache_dir, download=False
  ), cache_dir


@needs_shared
@pytest.mark.slow
def test_real_mnist(real_mnist):
  ds, _ = real_mnist
  assert (ds.name, ds.version, ds.from_cache) == ("mnist", "3.0.1", False)
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  assert ds.train_labels.shape == (60000,) and ds.test_labels.shape == (10000,)
  assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
  for labels in (ds.train_labels, ds.test_labels):
    assert labels.min() == 0 and labels.max() == 9
    assert len(np.unique(labels)) == 10
  assert ds.train_images.max() == 255 and ds.train_images.min() == 0


@needs_shared
@pytest.mark.slow
def test_real_mnist_matches_tfds_decoding_and_cache(real_mnist):
  ds, cache_dir = real_mnist
  source = tfds.data_source("mnist", split="train", data_dir=SHARED_DATA_DIR, download=False)
  for i in (0, 1, 59999):
    record = source[i]  # TFDS's own decoding
    np.testing.assert_array_equal(ds.train_images[i], record["image"])
    assert ds.train_labels[i] == record["label"]
  cached = load_dataset("mnist", data_dir=SHARED_DATA_DIR, cache_dir=cache_dir, download=False)
  assert cached.from_cache and cached.load_seconds < 1.0
  np.testing.assert_array_equal(cached.train_images, ds.train_images)
  np.testing.assert_array_equal(cached.test_labels, ds.test_labels)


def test_cache_changed_in_place_is_detected_and_rebuilt(tiny_data, tmp_path):
  """A cached label file overwritten in place with other labels (same size, still a valid
  `.npy`) fails its content hash: one warning line, the split decoded again (fresh process)."""
  data_dir, written = tiny_data
  load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path, download=False)
  (labels,) = (tmp_path / "datasets").glob("mnist-3.0.1-train-*.labels.npy")
  size = labels.stat().st_size
  wrong = np.load(labels)
  wrong = (wrong + 1) % 10  # every label changed, same dtype and shape
  with open(labels, "r+b") as f:  # in place: same file, same size
    header = len(labels.read_bytes()) - wrong.nbytes
    f.seek(header)
    f.write(wrong.tobytes())
  assert labels.stat().st_size == size
  assert np.load(labels).shape == written["mnist"]["train"][1].shape  # still a valid .npy

  code = (
    "import json\n"
    "from experiments.data import load_dataset\n"
    f"ds = load_dataset('mnist', data_dir={os.fspath(data_dir)!r}, "
    f"cache_dir={os.fspath(tmp_path)!r}, download=False)\n"
    "print(json.dumps({'from_cache': ds.from_cache, 'labels': ds.train_labels.tolist()}))\n"
  )
  proc, out = _python_json(code)
  assert not out["from_cache"]  # decoded again from TFDS
  assert out["labels"] == written["mnist"]["train"][1].tolist()
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("warning: ") and str(labels) in lines[0], (
    proc.stderr
  )
  assert "content hash" in lines[0] and "rebuilding" in lines[0]
  np.testing.assert_array_equal(np.load(labels), written["mnist"]["train"][1])  # rewritten
  fresh = _fresh_load("mnist", data_dir, tmp_path)  # and trusted again, from the index
  assert fresh["from_cache"] and not fresh["tfds_imported"]
  np.testing.assert_array_equal(fresh["arrays"][1], written["mnist"]["train"][1])


def test_index_records_a_content_hash_per_cached_array(tiny_data, tmp_path):
  data_dir, written = tiny_data
  load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path, download=False)
  (index,) = (tmp_path / "datasets").glob("mnist-*.index.json")
  entry = json.loads(index.read_text())
  for split in ("train", "test"):
    images, labels = written["mnist"][split]
    assert entry["splits"][split]["images_hash"] == data.content_hash(images)
    assert entry["splits"][split]["labels_hash"] == data.content_hash(labels)
