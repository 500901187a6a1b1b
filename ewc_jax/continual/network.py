"""The network a :class:`~ewc_jax.continual.config.Config` describes."""

from __future__ import annotations

from typing import Sequence

from ewc_jax import heads
from ewc_jax.continual.config import Config


def make_network(cfg: Config, class_groups: Sequence[Sequence[int]], **options) -> heads.Network:
  """The network ``cfg`` describes (scenario, backbone, hidden/width) for tasks made of
  ``class_groups``; ``options`` go to the backbone (e.g. ``input_shape=(28, 28, 1)`` for
  images stored flat). See :func:`ewc_jax.heads.make_network`."""
  if cfg.width is not None:
    options = {"width": int(cfg.width), **options}
  return heads.make_network(cfg.scenario, class_groups, cfg.hidden, backbone=cfg.backbone,
                            **options)
