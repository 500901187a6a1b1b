"""Tests for experiments.data: real TFDS array_record reading, cache, user errors.

`tfds.testing.mock_data` cannot drive this loader without TensorFlow (TFDS 4.9.10):
with `decoders=` its fake generator encodes images with TensorFlow, and its mocked
`__getitems__` is an unbound `functools.partial` that fails with a TypeError. So
the tests write tiny *real* prepared datasets ('mnist', 'fashion_mnist') into a
temp folder (PNG bytes from Pillow, serialized by the builder's own features,
written with array_record, metadata by `DatasetInfo.write_to_directory`) and read
them back through `tfds.data_source`. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image

from experiments import data
from experiments.data import DataError, load_dataset

SHARED_DATA_DIR = (Path(__file__).parents[1] / ".." / "shared" / "tensorflow_datasets").resolve()
TINY_SIZES = {"train": 12, "test": 5}


def _write_tiny_dataset(data_dir: Path, name: str, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes a small prepared array_record TFDS dataset; returns the arrays written."""
    builder = tfds.builder(name, data_dir=os.fspath(data_dir), file_format="array_record")
    out_dir = Path(os.fspath(builder.data_path))
    out_dir.mkdir(parents=True)
    features = builder.info.features
    height, width, _ = features["image"].shape
    rng = np.random.default_rng(seed)
    written: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    split_infos = []
    for split, n in TINY_SIZES.items():
        images = rng.integers(0, 256, (n, height, width, 1), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,)).astype(np.int32)
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_path, dataset_name=builder.name, split=split, filetype_suffix="array_record"
        )
        path = os.fspath(template.sharded_filepath(shard_index=0, num_shards=1))
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for image, label in zip(images, labels):
            png = io.BytesIO()
            Image.fromarray(image[..., 0]).save(png, format="PNG")
            writer.write(features.serialize_example({"image": png.getvalue(), "label": int(label)}))
        writer.close()
        split_infos.append(
            tfds.core.SplitInfo(
                name=split, shard_lengths=[n], num_bytes=os.path.getsize(path), filename_template=template
            )
        )
        written[split] = (images, labels)
    builder.info.set_splits(tfds.core.SplitDict(split_infos))
    builder.info.write_to_directory(builder.data_path)
    return written


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
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == [
        f"{name}-3.0.1-test.npz",
        f"{name}-3.0.1-train.npz",
    ]


def test_cache_hit_and_corrupt_cache_recovery(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    first = load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path)
    second = load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path)
    assert not first.from_cache and second.from_cache
    assert second.load_seconds < 1.0
    for a, b in zip(first[:4], second[:4]):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype

    cache_file = tmp_path / "datasets" / "mnist-3.0.1-train.npz"
    cache_file.write_bytes(b"not a zip file")
    third = load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path)
    assert not third.from_cache
    np.testing.assert_array_equal(third.train_images, first.train_images)
    np.testing.assert_array_equal(third.train_labels, first.train_labels)
    with np.load(cache_file) as npz:  # overwritten with a valid file
        np.testing.assert_array_equal(npz["images"], first.train_images)
    assert load_dataset("mnist", data_dir=data_dir, cache_dir=tmp_path).from_cache
    assert not [p for p in (tmp_path / "datasets").iterdir() if p.suffix == ".tmp"]


def test_missing_data_dir_without_download(tmp_path):
    with pytest.raises(DataError, match="data_dir") as info:
        load_dataset("mnist", data_dir=tmp_path / "nope", cache_dir=tmp_path / "cache", download=False)
    assert "TFDS_DATA_DIR" in str(info.value)


def test_unprepared_dataset_without_download(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="not prepared") as info:
        load_dataset("mnist", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", download=False)
    assert "data_dir" in str(info.value) and "TFDS_DATA_DIR" in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed")
def test_prepare_without_tensorflow_says_how_to_fix(tmp_path):
    (tmp_path / "manual").mkdir()
    with pytest.raises(DataError, match="make prepare-data"):
        load_dataset("mnist", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", manual_dir=tmp_path / "manual")


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
    return load_dataset("mnist", data_dir=SHARED_DATA_DIR, cache_dir=cache_dir, download=False), cache_dir


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
