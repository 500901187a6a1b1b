"""Tiny *real* prepared TFDS datasets (array_record), written by the tests: nothing downloads.

PNG bytes from Pillow, serialised by the builder's own features, written with array_record,
metadata by ``DatasetInfo.write_to_directory``; read back by ``tfds.data_source`` exactly like a
dataset TFDS prepared. ``learnable=True`` draws each image around a fixed random prototype of
its class (so a few steps of training separate the classes, as on MNIST); otherwise the pixels
are uniform noise.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image


def write_dataset(data_dir: Path, name: str, sizes: dict[str, int], seed: int,
                  learnable: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Writes ``name`` (a registered TFDS image dataset, e.g. mnist, cifar10, cifar100) with
  ``sizes[split]`` examples per split under ``data_dir``; returns the ``(images, labels)``
  written per split. Features other than image and label get placeholder values (a text id,
  the label modulo a ClassLabel's size)."""
  builder = tfds.builder(name, data_dir=os.fspath(data_dir), file_format="array_record")
  out_dir = Path(os.fspath(builder.data_path))
  out_dir.mkdir(parents=True)
  features = builder.info.features
  height, width, channels = features["image"].shape
  num_classes = features["label"].num_classes
  rng = np.random.default_rng(seed)
  prototypes = rng.integers(0, 2, (num_classes, height, width, channels)) * 200
  written: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  split_infos = []
  for split, n in sizes.items():
    labels = (np.arange(n) % num_classes if learnable else rng.integers(0, num_classes, (n,)))
    labels = rng.permutation(labels).astype(np.int32) if learnable else labels.astype(np.int32)
    if learnable:
      noise = rng.integers(0, 56, (n, height, width, channels))
      images = (prototypes[labels] + noise).astype(np.uint8)
    else:
      images = rng.integers(0, 256, (n, height, width, channels), dtype=np.uint8)
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_path, dataset_name=builder.name, split=split,
        filetype_suffix="array_record")
    path = os.fspath(template.sharded_filepath(shard_index=0, num_shards=1))
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for i, (image, label) in enumerate(zip(images, labels)):
      png = io.BytesIO()
      Image.fromarray(image[..., 0] if channels == 1 else image).save(png, format="PNG")
      example = {"image": png.getvalue(), "label": int(label)}
      for key, feature in features.items():  # the others (CIFAR's id, CIFAR-100's coarse label)
        if key not in example:
          example[key] = (f"{split}_{i}" if isinstance(feature, tfds.features.Text) else
                          int(label) % feature.num_classes)
      writer.write(features.serialize_example(example))
    writer.close()
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[n],
                                           num_bytes=os.path.getsize(path),
                                           filename_template=template))
    written[split] = (images, labels)
  builder.info.set_splits(tfds.core.SplitDict(split_infos))
  builder.info.write_to_directory(builder.data_path)
  return written
