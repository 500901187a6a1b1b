"""Train-step and Fisher examples/s of each backbone: mlp, cnn, resnet18 (BatchNorm).

    python -m benchmarks.backbones [--backbones=mlp,cnn,resnet18] [--scale=1]

Inputs as the benchmarks they serve: 28x28x1 (Split MNIST) for ``mlp`` (784-400-400) and
``cnn``, 32x32x3 (Split CIFAR) for the ResNets; 2-way task heads; random uint8 images (speed does
not depend on the values). Train step: EWC with p = 2 and one anchor (the merged statistics),
the train chunk of the runner (:func:`ewc_jax.continual.step.train_chunk`) over batches drawn from
device-resident data, as in training (BatchNorm
in train mode, its running statistics updated). Fisher: the empirical Fisher of the
consolidated parameters (evaluation mode), as the runner computes it after a task. Both compiled
with the runner's options (:mod:`ewc_jax.compiler_options`).
``--scale`` multiplies the number of examples timed (default sized for a CPU).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.train_step import filled_memory
from ewc_jax import algorithms, compiler_options, fisher, heads
from ewc_jax.continual import step as step_lib
from ewc_jax.continual import task_data

# name: (input shape, train batch, train steps, Fisher examples, Fisher batch) at --scale=1
SETUPS = {
    "mlp": ((28, 28, 1), 128, 16, 4096, 256),
    "cnn": ((28, 28, 1), 128, 4, 1024, 256),
    "resnet18": ((32, 32, 3), 32, 4, 256, 64),
    "resnet18_full": ((32, 32, 3), 32, 2, 64, 32),
}


def images(shape, n, seed):
  return jax.random.randint(jax.random.key(seed), (n,) + shape, 0, 255).astype(jnp.uint8)


def bench(name, scale):
  shape, batch, steps, fisher_n, fisher_batch = SETUPS[name]
  steps, fisher_n = steps * scale, fisher_n * scale
  options = compiler_options.for_platform(jax.default_backend())
  net = heads.make_network("task", [[0, 1], [2, 3]], backbone=name)
  params, model_state = heads.init_variables(net, jax.random.key(0),
                                             step_lib.scale_pixels(images(shape, 1, 0)))
  algo = algorithms.ewc(p=2.0)
  theta = heads.consolidated(net, params)
  memory = filled_memory(algo, theta, 1, jax.random.key(3))
  hyper = algorithms.Hyper(*(jnp.float32(v) for v in (10.0, 2.0, 1.0, 1e-3)))
  tx = step_lib.make_optimizer()

  n = batch * steps
  data = task_data.TaskData(images(shape, n, 1)[None], jax.random.randint(jax.random.key(2), (1, n),
                                                                        0, 2),
                        jnp.array([n], jnp.int32))
  order = step_lib.epoch_order(jax.random.key(4), data.counts[0], n, n)
  chunk = jax.jit(functools.partial(step_lib.train_chunk, step_lib.Step(
      net, algo, tx, batch_size=batch, num_steps=steps)), compiler_options=options)
  state = step_lib.init_train_state(tx, params, 1e-3, model_state)
  inputs = step_lib.ChunkInputs(data=data, order=order, start_step=jnp.int32(0),
                                task_index=jnp.int32(1), memory=memory, hyper=hyper,
                                key=jax.random.key(5))
  step_t = common.time_call(lambda: jax.block_until_ready(chunk(state, inputs)), repeats=3)

  x = step_lib.scale_pixels(images(shape, fisher_n, 6))
  y = jax.random.randint(jax.random.key(7), (fisher_n,), 0, 2)
  weigh = jax.jit(lambda p, s, x, y: fisher.fisher_diagonal(
      heads.consolidated_logits_fn(net, p, 0, s), heads.consolidated(net, p), x, y,
      batch_size=fisher_batch), compiler_options=options)
  fisher_t = common.time_call(lambda: jax.block_until_ready(weigh(params, model_state, x, y)),
                              repeats=3)
  return {"backbone": name, "input_shape": list(shape),
          "parameters": fisher.num_parameters(params),
          "model_state_values": fisher.num_parameters(model_state),
          "train_batch_size": batch, "train_examples_timed": n,
          "train_examples_per_s": n / step_t["median_s"],
          "train_ms_per_step": 1e3 * step_t["median_s"] / steps,
          "fisher_batch_size": fisher_batch, "fisher_examples_timed": fisher_n,
          "fisher_examples_per_s": fisher_n / fisher_t["median_s"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--backbones", default="mlp,cnn,resnet18")
  parser.add_argument("--scale", type=int, default=1)
  args = parser.parse_args()
  rows = []
  for name in args.backbones.split(","):
    row = bench(name, args.scale)
    rows.append(row)
    print(row, flush=True)
  common.write("backbones", {"algo": "ewc (p = 2, one anchor)", "fisher": "empirical",
                             "rows": rows})


if __name__ == "__main__":
  main()
