"""Fine-tuning: no regularisation (the lower bound)."""

import jax.numpy as jnp

from ewc_jax.algorithms.base import Algorithm


def finetune(p: float | None = None) -> Algorithm:
  del p  # no penalty: the exponent is unused
  return Algorithm(
      name="finetune",
      init=lambda backbone, num_tasks: (),
      penalty=lambda backbone, memory, hyper, task_index: jnp.zeros((), jnp.float32),
      consolidate=lambda memory, backbone, importance, task_index, hyper: memory,
      importance=None, penalty_free_first_task=True)
