"""``mlp``: the fully connected ReLU backbone (784-400-400 in van de Ven & Tolias 2019).

Any input ``[B, ...]`` is flattened to ``[B, D]`` first, so images and flat vectors give the same
numbers. No BatchNorm, no dropout: ``train`` is accepted (the backbone protocol) and ignored.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
  """Fully connected ReLU backbone: ``Dense(h) -> relu`` for each width ``h`` of ``hidden``."""
  hidden: Sequence[int] = (400, 400)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no train-mode behaviour
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return x


def mlp(hidden: Sequence[int] = (400, 400)) -> MLP:
  return MLP(hidden=tuple(hidden))
