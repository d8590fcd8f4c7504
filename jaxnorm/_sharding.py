r"""Explicit sharding: which axes of an array are split across devices in its type.

Under a mesh with ``AxisType.Explicit`` axes (``jax.make_mesh``'s default) an array's
sharding is part of its type, and some operations are not defined on a sharded axis: a
slice of size one (a pivot taken from the first element) or a reshape that splits the axis
other than as ``(shards, rest)``. The statistics read the sharding from here and, where a
reduction set spans a sharded axis, view that axis as ``(shards, rest)`` and merge the
shards' moments (:func:`jaxnorm._stats.shifted_moments`). Auto axes (GSPMD) and manual
axes (inside ``shard_map``) are not in the type: every operation is defined there, so they
report nothing.
"""

from __future__ import annotations

import math

import jax


def explicit_shards(x: jax.Array) -> dict[int, int]:
    """``{axis: number of shards}`` for each axis of ``x`` that its type shards over mesh
    axes of ``AxisType.Explicit``; empty outside such a mesh (or where this JAX has no
    sharding in types)."""
    try:
        sharding = jax.typeof(x).sharding
        spec, mesh = sharding.spec, sharding.mesh
        axis_types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
        sizes = dict(mesh.shape)
    except (AttributeError, TypeError, ValueError):
        return {}
    explicit = jax.sharding.AxisType.Explicit
    shards = {}
    for axis, entry in enumerate(tuple(spec)[: x.ndim]):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(n for n in names if axis_types.get(n) == explicit)
        count = math.prod(sizes[n] for n in names)
        if count > 1:
            shards[axis] = count
    return shards


def sharded_reduction(x: jax.Array, axes: tuple[int, ...]) -> dict[int, int]:
    """The reduction ``axes`` of ``x`` that are explicitly sharded, with their shard
    counts (:func:`explicit_shards`)."""
    return {a: n for a, n in explicit_shards(x).items() if a in axes}


def auto_batch_shards(x: jax.Array, axes: tuple[int, ...]) -> dict[int, int]:
    """``{0: k}`` when ``x``'s reduction sets span its leading (batch) axis inside
    ``jax.set_mesh`` of a mesh with Auto axes and ``k = `` its device count > 1 divides the
    batch: the batch then splits into ``k`` members, each within one device's shard if
    the partitioner shards the batch over any of those axes; else empty."""
    if not axes or axes[0] != 0 or explicit_shards(x):
        return {}
    try:
        mesh = jax.sharding.get_abstract_mesh()
        auto = [size for size, kind in zip(mesh.axis_sizes, mesh.axis_types, strict=True)
                if kind == jax.sharding.AxisType.Auto]
    except (AttributeError, TypeError, ValueError):
        return {}
    members = math.prod(auto)
    if members <= 1 or x.shape[0] % members or x.shape[0] == members and len(axes) == 1:
        return {}
    return {0: members}


def spanned_shards(x: jax.Array, axes: tuple[int, ...]) -> tuple[dict[int, int], bool]:
    """The shards that reduction sets over ``axes`` span, and whether they are explicit:
    :func:`sharded_reduction` if any, else :func:`auto_batch_shards`. Empty when every
    set lies within one device (the local statistics apply)."""
    explicit = sharded_reduction(x, axes)
    return (explicit, True) if explicit else (auto_batch_shards(x, axes), False)
