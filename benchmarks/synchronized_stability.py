"""Synchronized BatchNorm at |mean| >> std from the first step, jaxnorm vs Flax.

Run: ``python benchmarks/synchronized_stability.py``. One training step of
``BatchNorm(axis_name="d")`` under ``shard_map`` over 8 host devices (running mean 0, as at
the start of training) on float32 data ``offset + N(0, 1)`` of shape 64×4×4×16; prints, per
offset, the largest relative error of the batch variance the layer normalized with (read off
the normalized output: its standard deviation is ``sqrt(true var / used var)``) and the
range of the outputs' standard deviations (1 when right).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxnorm.linen  # noqa: E402

OFFSETS = (1e2, 1e3, 1e4)
SHAPE = (64, 4, 4, 16)


def output_std(library: object, x: np.ndarray) -> np.ndarray:
    """Per-channel standard deviation of one synchronized training step's output."""
    mesh = jax.make_mesh((8,), ("d",))
    layer = library.BatchNorm(use_running_average=False, axis_name="d")
    variables = library.BatchNorm(use_running_average=False).init(jax.random.key(0), x[:8])
    step = jax.shard_map(lambda v, x: layer.apply(v, x, mutable=["batch_stats"])[0],
                         mesh=mesh, in_specs=(P(), P("d")), out_specs=P("d"))
    with jax.set_mesh(mesh):
        y = jax.jit(step)(variables, jax.device_put(x, NamedSharding(mesh, P("d"))))
    return np.asarray(y, np.float64).std((0, 1, 2))


def main() -> None:
    if len(jax.devices()) < 8:
        sys.exit("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    print(f"{'offset':>8s} {'library':8s} {'max rel. variance error':>24s}  output std range")
    for offset in OFFSETS:
        x = np.random.default_rng(0).normal(offset, 1.0, SHAPE).astype(np.float32)
        for name, library in (("jaxnorm", jaxnorm.linen), ("flax", nn)):
            std = output_std(library, x)
            error = np.abs(1 / std**2 - 1).max()  # used var / true var - 1
            print(f"{offset:8.0e} {name:8s} {error:24.2e}  {std.min():.3g} .. {std.max():.3g}")


if __name__ == "__main__":
    main()
