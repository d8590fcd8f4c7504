"""Collectives per BatchNorm layer of a data-parallel training step, jaxnorm vs Flax.

Counts the cross-device operations in the optimized HLO (XLA:CPU's SPMD partitioner over
host devices, the same partitioner every backend runs) of one step of 8 × (3×3 conv ->
BatchNorm -> relu), the loss's gradients taken and the running statistics updated:

* ``shard_map``: ``BatchNorm(axis_name="d")`` inside ``jax.shard_map`` over the batch;
* ``gspmd``: ``jit`` of the plain model with the batch sharded over the mesh, the
  partitioner deriving the collectives (no ``axis_name``);

each on a mesh with ``AxisType.Explicit`` axes (``jax.make_mesh``'s default) and with
``AxisType.Auto`` axes. Per layer: the step's collectives less those of the same network
without normalization, divided by the layers (the normalization's parameter gradients
included). XLA:CPU's statistics keep a two-pass fallback behind a ``lax.cond``: its
collectives are in the program (counted here) but run only for ill-conditioned batches.
Usage::

    python benchmarks/collectives.py [--json benchmarks/collectives.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402

import jaxnorm.linen  # noqa: E402

LAYERS = 8
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OPCODE = re.compile(r"=\s*[^=]*?\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective instructions in optimized HLO text, by kind (async pairs counted once)."""
    return dict(Counter(m.group(1) for m in _OPCODE.finditer(hlo_text)))


def conv_net(norm: Any, axis_name: str | None) -> nn.Module:
    """``LAYERS`` × (3×3 conv, no bias -> ``norm`` in training mode -> relu)."""

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            for _ in range(LAYERS):
                x = nn.Conv(x.shape[-1], (3, 3), use_bias=False)(x)
                x = nn.relu(norm(use_running_average=False, axis_name=axis_name)(x))
            return x

    return ConvNet()


class NoNorm(nn.Module):
    """The baseline: the same network with no normalization (its collectives are the
    convolutions' own)."""

    use_running_average: bool = False
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def step_hlo(norm: Any, axis_type: AxisType, mapping: str) -> str:
    """Optimized HLO of one training step (loss, parameter gradients, statistics update);
    8 examples of 16×16×32 per device, float32."""
    devices = len(jax.devices())
    mesh = jax.make_mesh((devices,), ("d",), axis_types=(axis_type,))
    model = conv_net(norm, "d" if mapping == "shard_map" else None)
    images = jnp.zeros((8 * devices, 16, 16, 32), jnp.float32)
    variables = conv_net(norm, None).init(jax.random.key(0), images[:2])

    def step(variables: Any, images: jax.Array) -> Any:
        def loss(params: Any) -> tuple[jax.Array, Any]:
            y, updates = model.apply({**variables, "params": params}, images,
                                     mutable=["batch_stats"])
            return jnp.mean(jnp.square(y)), updates

        grads, updates = jax.grad(loss, has_aux=True)(variables["params"])
        return (jax.lax.pmean(grads, "d") if mapping == "shard_map" else grads), updates

    replicated, batch = PartitionSpec(), PartitionSpec("d")
    if mapping == "shard_map":
        step = jax.shard_map(step, mesh=mesh, in_specs=(replicated, batch),
                             out_specs=(replicated, replicated))
    with jax.set_mesh(mesh):
        placed = (jax.device_put(variables, NamedSharding(mesh, replicated)),
                  jax.device_put(images, NamedSharding(mesh, batch)))
        return jax.jit(step).lower(*placed).compile().as_text()


def records() -> list[dict[str, Any]]:
    """One record per library, mapping and mesh axis type."""
    rows = []
    for mapping in ("gspmd", "shard_map"):
        for axis_type in (AxisType.Explicit, AxisType.Auto):
            base = count_collectives(step_hlo(NoNorm, axis_type, mapping))
            for library, norm in (("jaxnorm", jaxnorm.linen.BatchNorm),
                                  ("flax", nn.BatchNorm)):
                counts = count_collectives(step_hlo(norm, axis_type, mapping))
                added = sum(counts.values()) - sum(base.values())
                rows.append({"mapping": mapping, "axis_type": axis_type.name,
                             "library": library, "layers": LAYERS, "collectives": counts,
                             "without_norm": base, "per_layer": round(added / LAYERS, 2)})
                print(f"{mapping:9s} {axis_type.name:8s} {library:8s} "
                      f"{rows[-1]['per_layer']:5.2f} per layer  {counts} (no norm: {base})",
                      flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args()
    rows = records()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "devices": len(jax.devices()),
                       "records": rows}, f, indent=1)


if __name__ == "__main__":
    main()
