"""The comparison both sharding checks make (tests/sharded_check.py in one process,
tests/multiprocess_check.py in each of several): a sharded result against the unsharded one,
shard by shard over the shards this process holds (so it also serves arrays that are not fully
addressable)."""

from __future__ import annotations

import jax
import numpy as np


def compare(problems: list, name: str, got, want, like, tol: float = 1e-6) -> None:
  """Appends to ``problems`` a line per leaf of ``got`` whose sharding differs from ``like``'s
  (the sharded input it should keep), whose shards have other per-device shapes than
  ``like``'s, or whose shards differ from ``want`` (unsharded) by more than ``tol`` times
  ``want``'s largest magnitude."""
  for (path, g), w, l in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                             jax.tree.leaves(want), jax.tree.leaves(like)):
    where = f"{name}{jax.tree_util.keystr(path)}"
    if not g.sharding.is_equivalent_to(l.sharding, g.ndim):
      problems.append(f"{where}: sharding {g.sharding} != {l.sharding}")
      continue
    if g.addressable_shards[0].data.shape != l.addressable_shards[0].data.shape:
      problems.append(f"{where}: a device holds {g.addressable_shards[0].data.shape}")
    w = np.asarray(w)
    scale = max(float(np.max(np.abs(w))), 1e-30)
    for shard in g.addressable_shards:
      err = float(np.max(np.abs(np.asarray(shard.data) - w[shard.index]), initial=0.0))
      if err > tol * scale:
        problems.append(f"{where}: shard {shard.index} differs by {err}")
