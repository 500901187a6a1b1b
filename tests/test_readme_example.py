"""The README's library example runs as written (in a Flax + optax loop)."""

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs():
  code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))

  model = Model()
  params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  tx = optax.adam(1e-2)
  x_a = jax.random.normal(jax.random.key(1), (32, 4))
  y_a = jnp.argmax(x_a[:, :3], axis=-1)
  scope = {"model": model, "params": params, "tx": tx, "x_a": x_a, "y_a": y_a}
  exec(compile(code, str(README), "exec"), scope)  # pylint: disable=exec-used
  opt_state = tx.init(params)
  p = params
  for _ in range(3):
    p, opt_state, loss = scope["train_step"](p, opt_state, x_a, y_a, scope["anchors"])
  assert np.isfinite(float(loss))
  assert not np.allclose(jax.tree.leaves(p)[0], jax.tree.leaves(params)[0])
