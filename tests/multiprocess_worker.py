"""One process of the two-process BatchNorm training run in ``test_multiprocess.py``.

Usage: ``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUTPUT.npz``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` and ``JAX_PLATFORMS=cpu``. Each
process joins JAX's multi-host runtime (``jax.distributed``, gloo CPU collectives), feeds
its half of every global batch, and trains a synced BatchNorm with ``shard_map`` over the
global mesh. The data and the step are also imported by the test for the one-process run.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm import linen as jl

STEPS = 3
GLOBAL_BATCH = 32
LEARNING_RATE = 0.1
SETTINGS = {"momentum": 0.9, "unbiased_running_var": True}


def global_batches() -> np.ndarray:
    """``(STEPS, GLOBAL_BATCH, 3, 4)`` inputs followed by as many loss weights."""
    rng = np.random.default_rng(0)
    shape = (STEPS, GLOBAL_BATCH, 3, 4)
    inputs = rng.standard_normal(shape) * 3 + 2
    weights = rng.standard_normal(shape)
    return inputs.astype(np.float32), weights.astype(np.float32)


def initial_variables(module: jl.BatchNorm) -> dict:
    return jax.jit(module.init)(jax.random.key(0), jnp.ones((4, 3, 4)))


def train_step(module: jl.BatchNorm, variables: dict, x: jax.Array, weights: jax.Array):
    """One SGD step on ``sum(y * weights)``; returns the outputs and the new variables."""

    def loss(params):
        y, updated = module.apply(
            {**variables, "params": params}, x, mutable=["batch_stats"]
        )
        total = jnp.sum(y * weights)
        if module.axis_name is not None:
            total = jax.lax.psum(total, module.axis_name)
        return total, (y, updated)

    (_, (y, updated)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, variables["params"], grads)
    return y, {"params": params, **updated}


def main(process_id: int, num_processes: int, port: int, output: str) -> None:
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
    )
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    batch_sharding = NamedSharding(mesh, P("batch"))
    module = jl.BatchNorm(use_running_average=False, axis_name="batch", **SETTINGS)
    variables = initial_variables(module)
    step = jax.jit(
        jax.shard_map(
            functools.partial(train_step, module),
            mesh=mesh,
            in_specs=(P(), P("batch"), P("batch")),
            out_specs=(P("batch"), P()),
        )
    )
    inputs, weights = global_batches()
    local = slice(
        process_id * GLOBAL_BATCH // num_processes,
        (process_id + 1) * GLOBAL_BATCH // num_processes,
    )
    outputs = []
    for x, w in zip(inputs, weights, strict=True):
        x = jax.make_array_from_process_local_data(batch_sharding, x[local])
        w = jax.make_array_from_process_local_data(batch_sharding, w[local])
        y, variables = step(variables, x, w)
        outputs.append(multihost_utils.process_allgather(y, tiled=True))
    np.savez(
        output,
        outputs=np.stack(outputs),
        mean=np.asarray(variables["batch_stats"]["mean"]),
        var=np.asarray(variables["batch_stats"]["var"]),
        scale=np.asarray(variables["params"]["scale"]),
        bias=np.asarray(variables["params"]["bias"]),
        devices=np.asarray([jax.device_count(), jax.local_device_count()]),
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
