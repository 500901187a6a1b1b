"""Input scaling by name (``input_norm``): how uint8 images become the model's float inputs.

* ``none``: ``x / 255``, in [0, 1] (van de Ven & Tolias, Hsu et al., the peers' default run).
* ``mnist``: ``(x / 255 - 0.1307) / 0.3081``, torchvision's MNIST normalisation (Avalanche's
  benchmarks).
* ``per_channel``: ``(x / 255 - mean_c) / std_c`` with each channel's mean and standard
  deviation over the dataset's whole training split (the CIFAR convention of Mammoth, Avalanche
  and CLArena, measured instead of hard-coded).

The result keeps the input's shape (the MLP flattens it; the convolutional backbones take
``[B, H, W, C]`` images).

    >>> import numpy as np
    >>> from experiments import input_norm
    >>> x = np.full((1, 2, 2, 1), 255, np.uint8)
    >>> [round(float(v), 4) for v in np.ravel(input_norm.make("mnist")(x))]
    [2.8215, 2.8215, 2.8215, 2.8215]
    >>> train = np.stack([np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 255, np.uint8)])
    >>> norm = input_norm.make("per_channel", train)
    >>> norm.stats
    {'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]}
    >>> [float(v) for v in np.ravel(norm(train[1:]))[:3]]
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from ewc_jax import errors
from ewc_jax.continual import step as step_lib

NAMES = ("none", "mnist", "per_channel")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def check(name: str) -> None:
  """:class:`ewc_jax.errors.SettingError` naming ``input_norm`` unless ``name`` is known."""
  if name not in NAMES:
    raise errors.SettingError.invalid("input_norm", name, "one of " + ", ".join(NAMES))


def _scale(x):
  return jnp.asarray(x).astype(jnp.float32) / 255.0


def mnist_normalize(x):
  """uint8 images -> ``(x / 255 - 0.1307) / 0.3081`` float32, in the input's shape."""
  return (_scale(x) - MNIST_MEAN) / MNIST_STD


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and (population) std of ``images / 255`` (``[N, H, W, C]`` uint8),
  accumulated in float64 over chunks (no full-size float copy)."""
  channels = images.shape[-1]
  total = np.zeros(channels)
  squares = np.zeros(channels)
  for start in range(0, len(images), chunk):
    part = images[start:start + chunk].reshape(-1, channels).astype(np.float64) / 255.0
    total += part.sum(0)
    squares += np.square(part).sum(0)
  count = images.size // channels
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
  return mean, np.where(std > 0, std, 1.0)


class _PerChannel:
  """``(x / 255 - mean) / std`` per channel; ``stats`` for results.json."""

  def __init__(self, mean: np.ndarray, std: np.ndarray):
    self.mean = np.asarray(mean, np.float32)
    self.std = np.asarray(std, np.float32)
    self.stats = {"mean": [round(float(v), 6) for v in mean],
                  "std": [round(float(v), 6) for v in std]}

  def __call__(self, x):
    return (_scale(x) - self.mean) / self.std


def make(name: str, train_images: np.ndarray | None = None) -> Callable:
  """The model-input function called ``name`` (one of :data:`NAMES`); ``per_channel`` takes its
  statistics from ``train_images``."""
  check(name)
  if name == "none":
    return step_lib.scale_pixels
  if name == "mnist":
    return mnist_normalize
  if train_images is None:
    raise ValueError("input_norm='per_channel' needs the training images for its statistics.")
  return _PerChannel(*channel_stats(train_images))
