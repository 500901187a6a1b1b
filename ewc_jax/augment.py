"""On-device data augmentation: random crop with zero padding and horizontal flip, keyed.

The CIFAR augmentation of the continual-learning libraries (Mammoth, Avalanche, CLArena:
``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``), as a pure function of a PRNG key
and a batch, so it runs inside the compiled train step and a resumed run draws the same crops:

* pad each image with ``padding`` zeros on every side, then cut an ``H×W`` window at an offset
  drawn uniformly from ``{0, ..., 2·padding}²`` per image;
* mirror each image left-right with probability 1/2.

Applied to the model inputs (after :mod:`experiments.input_norm`), to training batches only:
evaluation and the Fisher see the images as they are.

    >>> import jax, jax.numpy as jnp
    >>> from ewc_jax import augment
    >>> x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    >>> y = augment.crop_and_flip(jax.random.key(0), x, padding=1)
    >>> y.shape, bool(jnp.all(augment.crop_and_flip(jax.random.key(0), x, padding=1) == y))
    ((2, 4, 4, 1), True)
    >>> bool(jnp.all(augment.crop_and_flip(jax.random.key(0), x, padding=0, flip=False) == x))
    True
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ewc_jax import errors

NAMES = ("none", "crop_flip")


def crop_and_flip(key: jax.Array, x: jax.Array, padding: int = 4, flip: bool = True) -> jax.Array:
  """``x`` (``[B, H, W, C]``) randomly cropped after zero padding, and flipped (see module)."""
  if x.ndim != 4:
    raise ValueError(f"`x` should be a batch of [B, H, W, C] images, but got shape {x.shape}.")
  if padding < 0:
    raise ValueError(f"`padding` should be >= 0, but got padding={padding}.")
  b, h, w, _ = x.shape
  k_crop, k_flip = jax.random.split(key)
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * padding + 1)

  def window(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

  out = jax.vmap(window)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(k_flip, 0.5, (b,))
    out = jnp.where(mirror[:, None, None, None], out[:, :, ::-1, :], out)
  return out


def make(name: str, padding: int = 4) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
  """``augment(key, x)`` called ``name`` (one of :data:`NAMES`; ``"none"``: None)."""
  if name not in NAMES:
    raise errors.SettingError.invalid("augment", name, "one of " + ", ".join(NAMES))
  if name == "none":
    return None
  return lambda key, x: crop_and_flip(key, x, padding)
