"""Image-shaped inputs of the convolutional backbones: ``[B, H, W, C]`` (NHWC)."""

from __future__ import annotations

from typing import Sequence

import jax


def as_images(x: jax.Array, input_shape: Sequence[int] | None, backbone: str) -> jax.Array:
  """``x`` as ``[B, H, W, C]`` images.

  ``input_shape=(H, W, C)`` reshapes any ``[B, ...]`` of ``H·W·C`` values per example (e.g. MNIST
  stored flat as ``[B, 784]``); without it ``[B, H, W, C]`` is used as is and ``[B, H, W]``
  (grayscale) gains a channel axis. Anything else is refused, naming ``input_shape``.
  """
  if input_shape is not None:
    shape = tuple(int(d) for d in input_shape)
    size = 1
    for d in shape:
      size *= d
    per_example = x.size // max(x.shape[0], 1)
    if len(shape) != 3 or per_example != size:
      raise ValueError(f"`input_shape`={shape!r} is invalid for backbone {backbone!r}: expected "
                       f"(H, W, C) with H·W·C = {per_example}, the size of one input of shape "
                       f"{tuple(x.shape[1:])}.")
    return x.reshape((x.shape[0],) + shape)
  if x.ndim == 4:
    return x
  if x.ndim == 3:
    return x[..., None]
  raise ValueError(f"backbone {backbone!r} takes images [B, H, W, C] (or [B, H, W]), but got "
                   f"inputs of shape {tuple(x.shape)}: keep the images unflattened, or pass "
                   "`input_shape`=(H, W, C).")
