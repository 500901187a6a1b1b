"""Backbones by name (``Config.backbone``, ``--backbone``): one small module each, as the algorithms.

    >>> from ewc_jax import backbones
    >>> backbones.NAMES
    ('mlp', 'cnn', 'resnet18', 'resnet18_full')
    >>> backbones.make("resnet18", width=8).width
    8

A backbone is a Flax linen module mapping inputs ``[B, ...]`` to features ``[B, F]``; the heads
(:mod:`ewc_jax.heads`) sit on top. The built-in ones:

* ``mlp`` (:mod:`~ewc_jax.backbones.mlp`, option ``hidden``): flattens any input.
* ``cnn`` (:mod:`~ewc_jax.backbones.cnn`, option ``input_shape``): the CNN of flax/examples/mnist.
* ``resnet18`` / ``resnet18_full`` (:mod:`~ewc_jax.backbones.resnet`, options ``width``,
  ``input_shape``): the reduced ResNet-18 (width 20) of GEM / Mammoth / Avalanche, with BatchNorm;
  width 64 for the full one.

The convolutional backbones take NHWC images ``[B, H, W, C]`` (``[B, H, W]`` gains a channel
axis); data stored flat (``[B, H·W·C]``) need ``input_shape=(H, W, C)``.

Your own module works the same way (pass the instance where a name is accepted, e.g.
``heads.make_network(..., backbone=MyNet())``). The protocol:

* ``__call__(self, x)`` or ``__call__(self, x, train: bool)``: when it takes ``train``, the
  runner passes ``train=True`` in the train step and ``train=False`` everywhere else
  (initialisation, evaluation, Fisher), e.g. ``nn.BatchNorm(use_running_average=not train)``
  and ``nn.Dropout(rate, deterministic=not train)``.
* Every variable collection but ``params`` (e.g. BatchNorm's ``batch_stats``) is *model state*:
  updated by the train step (``mutable``), read as is elsewhere, never consolidated by EWC.
* Dropout draws from the ``"dropout"`` PRNG stream, which the runner derives from the run's seed
  for every train step (see :func:`ewc_jax.continual.run`).
* On CPU, pass ``conv_general_dilated=loop_conv if train else None`` to your ``nn.Conv`` layers
  (:mod:`ewc_jax.loop_conv`): XLA:CPU runs the plain convolution's gradients up to ~35x
  slower inside the runner's compiled loop; the built-in backbones do this.

An NNX module: wrap its *class* with ``flax.nnx.bridge.to_linen`` (the arguments after the class
go to its constructor, ``rngs`` is added), e.g. ``backbone=nnx.bridge.to_linen(MyNNXNet, 3)``:
its ``nnx.Param`` become ``params`` (consolidated as above), its ``nnx.BatchStat`` the
``batch_stats`` model state. Give its ``__call__`` a ``train: bool`` and pass it on
(``self.bn(x, use_running_average=not train)``, ``self.drop(x, deterministic=not train)``;
build ``nnx.Dropout(rate, rngs=rngs)`` in ``__init__``): the wrapper rebuilds the module at
every call, so ``.train()`` / ``.eval()`` cannot reach it, and a wrapped module with such layers
but no ``train`` is refused (:func:`ewc_jax.heads.make_backbone`). An NNX instance itself is
refused with the same advice.
"""

from __future__ import annotations

import inspect
from typing import Callable

import flax.linen as nn

from ewc_jax.backbones.cnn import CNN, cnn
from ewc_jax.loop_conv import loop_conv
from ewc_jax.backbones.mlp import MLP, mlp
from ewc_jax.backbones.resnet import BasicBlock, ResNet18, resnet18, resnet18_full

REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
    "resnet18_full": resnet18_full,
}
NAMES = tuple(REGISTRY)


def options(name: str) -> tuple[str, ...]:
  """The keyword options of backbone ``name`` (e.g. ``("width", "input_shape")``)."""
  _check_name(name)
  return tuple(inspect.signature(REGISTRY[name]).parameters)


def make(name: str, **opts) -> nn.Module:
  """The backbone registered as ``name``, built with ``opts`` (see :func:`options`)."""
  allowed = options(name)
  for key in opts:
    if key not in allowed:
      raise ValueError(f"`{key}` is not an option of backbone={name!r}: expected "
                       f"{', '.join(allowed) if allowed else 'no options'}.")
  return REGISTRY[name](**opts)


def _check_name(name: str) -> None:
  if name not in REGISTRY:
    raise ValueError(f"`backbone` must be one of {', '.join(NAMES)}, but got backbone={name!r}.")


__all__ = ["BasicBlock", "CNN", "MLP", "NAMES", "REGISTRY", "ResNet18", "cnn", "loop_conv", "make",
           "mlp", "options", "resnet18", "resnet18_full"]
