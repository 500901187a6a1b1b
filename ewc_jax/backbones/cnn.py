"""``cnn``: the CNN of flax/examples/mnist, without its classifier.

``Conv(32, 3x3) -> relu -> avg_pool(2x2, stride 2) -> Conv(64, 3x3) -> relu -> avg_pool ->
flatten -> Dense(256) -> relu``; the heads (``Dense(classes)``) are the last layer of that
example. Convolutions use ``SAME`` padding, so a 28x28x1 input gives 7·7·64 = 3,136 features
before the Dense layer (824,458 parameters with one 10-way head, as flax's example). Inputs: NHWC
images (see :func:`ewc_jax.backbones.images.as_images`). No BatchNorm, no dropout; in train mode
the convolutions are :func:`ewc_jax.loop_conv.loop_conv` (same values, gradients
that stay fast inside the runner's loop on CPU).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from ewc_jax.loop_conv import loop_conv
from ewc_jax.backbones.images import as_images


class CNN(nn.Module):
  """Two 3x3 convolutions (32, 64 channels) with 2x2 average pooling, then ``Dense(256)``."""
  input_shape: Sequence[int] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = as_images(x, self.input_shape, "cnn")
    conv = loop_conv if train else None
    for features in (32, 64):
      x = nn.relu(nn.Conv(features, kernel_size=(3, 3), conv_general_dilated=conv)(x))
      x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.relu(nn.Dense(256)(x))


def cnn(input_shape: Sequence[int] | None = None) -> CNN:
  return CNN(input_shape=None if input_shape is None else tuple(input_shape))
