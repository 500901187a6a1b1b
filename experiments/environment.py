"""What a result was measured on: library versions, backend and device (results.json's
``environment``)."""

from __future__ import annotations

import platform

import flax
import jax
import optax

import ewc_jax


def environment() -> dict:
  """Versions of ewc_jax, Python, JAX, Flax and optax; backend, first device, device count and
  platform."""

  dev = jax.devices()[0]
  return {"ewc_jax": ewc_jax.__version__, "python": platform.python_version(),
          "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "backend": jax.default_backend(),
          "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
          "num_devices": jax.device_count(), "platform": platform.platform()}
