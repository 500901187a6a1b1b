"""Peak RSS of the regulariser memory at 5 vs 50 tasks: ewc grows with tasks, ewc_merged and
online_ewc stay flat.

    python -m benchmarks.memory

Each (algo, tasks) pair runs in a fresh subprocess: build the MLP 784-400-400 backbone, the
algorithm's memory for T tasks, consolidate T − 1 random anchors (as after each task; no training,
which does not change the memory's size) and evaluate the penalty and its gradient once, then
report ``ru_maxrss``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from benchmarks import common

ALGOS = ("ewc", "ewc_merged", "online_ewc")
TASKS = (5, 50)


def child(algo_name: str, num_tasks: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ewc_jax import algorithms, heads  # pylint: disable=import-outside-toplevel
  net = heads.task_incremental(num_tasks=1, classes_per_task=2)
  backbone = heads.init_params(net, jax.random.key(0), jnp.ones((1, 784)))["backbone"]
  algo = algorithms.make(algo_name, p=2.0)
  hyper = algorithms.Hyper(*(jnp.float32(v) for v in (1.0, 2.0, 0.9, 1e-3)))
  memory = algo.init(backbone, num_tasks)
  consolidate = jax.jit(algo.consolidate)
  key = jax.random.key(1)
  for t in range(num_tasks - 1):
    key, k = jax.random.split(key)
    imp = jax.tree.map(lambda x: jax.random.uniform(k, x.shape), backbone)
    memory = consolidate(memory, backbone, imp, jnp.int32(t), hyper)
  value, grad = jax.jit(jax.value_and_grad(algo.penalty))(backbone, memory, hyper, jnp.int32(0))
  jax.block_until_ready((value, grad))
  memory_bytes = sum(x.nbytes for x in jax.tree.leaves(memory))
  return {"algo": algo_name, "tasks": num_tasks, "memory_mb": memory_bytes / 2**20,
          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
  if len(sys.argv) == 3:
    print(json.dumps(child(sys.argv[1], int(sys.argv[2]))))
    return
  rows = []
  for algo in ALGOS:
    for tasks in TASKS:
      out = subprocess.run([sys.executable, "-m", "benchmarks.memory", algo, str(tasks)],
                           capture_output=True, text=True, check=True)
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(rows[-1], flush=True)
  by = {(r["algo"], r["tasks"]): r for r in rows}
  growth = {a: by[(a, TASKS[1])]["peak_rss_mb"] / by[(a, TASKS[0])]["peak_rss_mb"] for a in ALGOS}
  common.write("memory", {"rows": rows, "peak_rss_ratio_50_vs_5_tasks": growth})


if __name__ == "__main__":
  main()
