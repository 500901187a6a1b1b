"""Parameter initialisations by name (``Config.init``): Flax's own, or PyTorch's defaults.

Papers' code is mostly PyTorch, whose ``nn.Linear`` and ``nn.Conv2d`` start from
``kaiming_uniform_(a=√5)``: weights and biases both uniform in ``±1/√fan_in``. Flax's
``nn.Dense`` / ``nn.Conv`` start from LeCun-normal weights (std ``1/√fan_in``, truncated) and
zero biases: weights √3 times larger in spread, biases zero. ``"pytorch"`` redraws every kernel
and its bias the PyTorch way after Flax's initialisation; everything else (BatchNorm's scale
and bias, which PyTorch also starts at 1 and 0) is kept.

    >>> import jax, jax.numpy as jnp
    >>> from ewc_jax import initializers
    >>> params = {"dense": {"kernel": jnp.zeros((400, 10)), "bias": jnp.zeros(10)}}
    >>> new = initializers.pytorch_default(jax.random.key(0), params)
    >>> bound = 1 / 400 ** 0.5
    >>> bool(jnp.all(jnp.abs(new["dense"]["kernel"]) <= bound))
    True
    >>> bool(jnp.all(new["dense"]["bias"] != 0)) and bool(jnp.all(jnp.abs(new["dense"]["bias"]) <= bound))
    True
"""

from __future__ import annotations

import math
from typing import Any

import jax

NAMES = ("flax", "pytorch")
PyTree = Any


def pytorch_default(key: jax.Array, params: PyTree) -> PyTree:
  """``params`` with every ``kernel`` (a dict entry; ``fan_in`` = the product of all its axes
  but the last: ``[in, out]`` dense, ``[kh, kw, in, out]`` convolution) redrawn uniform in
  ``±1/√fan_in``, and its sibling ``bias``, if any, the same; other leaves unchanged.

  PyTorch's default for ``nn.Linear`` / ``nn.Conv2d`` (``kaiming_uniform_(a=√5)`` gives the
  bound ``√(6 / ((1 + 5) fan_in)) = 1/√fan_in``; the bias bound is ``1/√fan_in`` too). Keys are
  drawn per kernel, in the order of ``jax.tree_util`` paths.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  kernels = [path for path, _ in flat if _name(path[-1]) == "kernel"]
  keys = dict(zip(map(_path_str, kernels), jax.random.split(key, max(len(kernels), 1))))
  by_path = {_path_str(path): leaf for path, leaf in flat}

  def redraw(path, leaf):
    name, parent = _name(path[-1]), _path_str(path[:-1])
    kernel_path = f"{parent}/kernel"
    if name not in ("kernel", "bias") or kernel_path not in keys:
      return leaf
    kernel = by_path[kernel_path]
    bound = 1.0 / math.sqrt(max(1, math.prod(kernel.shape[:-1])))
    k_kernel, k_bias = jax.random.split(keys[kernel_path])
    k = k_kernel if name == "kernel" else k_bias
    return jax.random.uniform(k, leaf.shape, leaf.dtype, -bound, bound)

  return jax.tree_util.tree_map_with_path(redraw, params)


def apply(name: str, key: jax.Array, params: PyTree) -> PyTree:
  """The initialisation ``name`` (one of :data:`NAMES`) of Flax-initialised ``params``."""
  if name == "flax":
    return params
  if name == "pytorch":
    return pytorch_default(key, params)
  raise ValueError(f"`init` must be one of {', '.join(NAMES)}, but got init={name!r}.")


def _name(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def _path_str(path) -> str:
  return "/".join(_name(e) for e in path)
