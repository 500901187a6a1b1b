r"""``resnet18``: the reduced ResNet-18 of continual-learning papers; ``resnet18_full``: width 64.

The ResNet-18 of GEM (Lopez-Paz & Ranzato 2017), used by Mammoth and Avalanche
(``SlimResNet18``): a 3x3 stem convolution with stride 1 and no max-pooling, then four stages of
two :class:`BasicBlock`\ s with ``width · (1, 2, 4, 8)`` channels (strides 1, 2, 2, 2), every
convolution without bias and followed by BatchNorm, and global average pooling, giving
``8 · width`` features. ``width`` = 20 (``nf`` of those papers; 1,094,750 parameters with one
10-way head on 32x32x3 inputs) or 64 (``resnet18_full``, the CIFAR ResNet-18 of He et al. 2016
as in kuangliu/pytorch-cifar: 11,173,962 parameters with one 10-way head).

Padding as PyTorch's: 1 on every side of the 3x3 convolutions (also with stride 2, where Flax's
``SAME`` would pad 0 before and 1 after), 0 for the 1x1 shortcut projections. BatchNorm as
``torch.nn.BatchNorm2d``'s defaults: running averages with momentum 0.1 (Flax ``momentum=0.9``)
and epsilon 1e-5. Initialisation: Flax's defaults (LeCun normal convolutions, BatchNorm scale 1
and bias 0), not PyTorch's. In train mode the convolutions are
:func:`ewc_jax.loop_conv.loop_conv` (same values; gradients that stay fast inside
the runner's scan on CPU).

``train=True``: BatchNorm normalises with the batch statistics and updates the running averages
(the ``batch_stats`` collection); ``train=False`` normalises with the running averages.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ewc_jax.loop_conv import loop_conv
from ewc_jax.backbones.images import as_images

STAGES = (2, 2, 2, 2)
_PAD1 = ((1, 1), (1, 1))


def _conv(train: bool):
  """Bias-free ``nn.Conv``; :func:`~ewc_jax.loop_conv.loop_conv` in train mode."""
  return functools.partial(nn.Conv, use_bias=False,
                           conv_general_dilated=loop_conv if train else None)


class BasicBlock(nn.Module):
  """``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``; the shortcut is a 1x1
  convolution with BatchNorm when the stride or the channel count changes, else the identity."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5)
    conv = _conv(train)
    strides = (self.stride, self.stride)
    y = conv(self.features, (3, 3), strides, padding=_PAD1)(x)
    y = nn.relu(norm()(y))
    y = conv(self.features, (3, 3), padding=_PAD1)(y)
    y = norm()(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), strides, padding=0)(x)
      x = norm()(x)
    return nn.relu(y + x)


class ResNet18(nn.Module):
  """The reduced ResNet-18 (see the module docstring); ``[B, 8 · width]`` features."""
  width: int = 20
  input_shape: Sequence[int] | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = as_images(x, self.input_shape, "resnet18")
    x = _conv(train)(self.width, (3, 3), padding=_PAD1)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
    for stage, blocks in enumerate(STAGES):
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2 ** stage, stride)(x, train)
    return jnp.mean(x, axis=(1, 2))


def _check_width(width) -> int:
  if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
    raise ValueError(f"`width`={width!r} is invalid: expected an integer >= 1 (channels of the "
                     "first ResNet stage).")
  return int(width)


def resnet18(width: int = 20, input_shape: Sequence[int] | None = None) -> ResNet18:
  return ResNet18(width=_check_width(width),
                  input_shape=None if input_shape is None else tuple(input_shape))


def resnet18_full(width: int = 64, input_shape: Sequence[int] | None = None) -> ResNet18:
  return resnet18(width, input_shape)
