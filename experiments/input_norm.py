"""Input scaling by name (``input_norm``): how uint8 images become the model's float inputs.

* ``none``: ``x / 255``, in [0, 1] (van de Ven & Tolias, Hsu et al., the peers' default run).
* ``mnist``: ``(x / 255 - 0.1307) / 0.3081``, torchvision's MNIST normalisation (Avalanche's
  benchmarks).

Both flatten to ``[B, H*W*C]`` (see :func:`ewc_jax.train.scale_pixels`).

    >>> import numpy as np
    >>> from experiments import input_norm
    >>> x = np.full((1, 2, 2, 1), 255, np.uint8)
    >>> [round(float(v), 4) for v in input_norm.get("mnist")(x)[0]]
    [2.8215, 2.8215, 2.8215, 2.8215]
"""

from __future__ import annotations

from typing import Callable

from ewc_jax import errors

NAMES = ("none", "mnist")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_normalize(x):
  """uint8 images -> ``(x / 255 - 0.1307) / 0.3081`` float32, flattened to ``[B, H*W*C]``."""
  from ewc_jax import train  # pylint: disable=import-outside-toplevel
  return (train.scale_pixels(x) - MNIST_MEAN) / MNIST_STD


def get(name: str) -> Callable:
  """The model-input function called ``name`` (one of :data:`NAMES`)."""
  from ewc_jax import train  # pylint: disable=import-outside-toplevel
  choices = {"none": train.scale_pixels, "mnist": mnist_normalize}
  if name not in choices:
    raise errors.SettingError.invalid("input_norm", name, "one of " + ", ".join(NAMES))
  return choices[name]
