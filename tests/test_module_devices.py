"""BatchNorm over 8 host CPU devices: pmap, shard_map, nn.vmap (all with axis_name) and
plain jit over a NamedSharding batch give the outputs and running statistics of one
device on the whole batch, also when devices hold different numbers of unmasked rows."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxnorm import linen as jl
from jaxnorm import nnx as jx

DEVICES = 8
PER_DEVICE = 4
SETTINGS = {"momentum": 0.8, "unbiased_running_var": True}

pytestmark = pytest.mark.skipif(
    jax.device_count() < DEVICES, reason="needs 8 (host CPU) devices; see conftest.py"
)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((DEVICES * PER_DEVICE, 3, 4)) * 2 + 1).astype(np.float32)


def _variables():
    rng = np.random.default_rng(5)
    variables = {
        "params": {"scale": rng.uniform(0.5, 1.5, 4), "bias": rng.uniform(-1, 1, 4)},
        "batch_stats": {"mean": rng.uniform(-1, 1, 4), "var": rng.uniform(0.5, 1.5, 4)},
    }
    return jax.tree.map(lambda a: a.astype(np.float32), variables)


def _single_device(x, mask=None):
    module = jl.BatchNorm(use_running_average=False, **SETTINGS)
    return jax.jit(functools.partial(module.apply, mutable=["batch_stats"]))(
        _variables(), x, mask=mask
    )


def _per_device(a):
    return a.reshape(DEVICES, PER_DEVICE, *a.shape[1:])


def _assert_same(result, reference):
    (y, stats), (y_ref, stats_ref) = result, reference
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 stats, stats_ref)


def _synced(**kwargs):
    return jl.BatchNorm(use_running_average=False, axis_name="batch", **SETTINGS, **kwargs)


def test_pmap_with_axis_name_equals_one_device():
    x = _batch()
    apply = jax.pmap(
        lambda xb: _synced().apply(_variables(), xb, mutable=["batch_stats"]),
        axis_name="batch",
    )
    y, stats = apply(_per_device(x))
    for device in range(1, DEVICES):  # every device holds the same statistics
        jax.tree.map(lambda a, d=device: np.testing.assert_array_equal(a[d], a[0]), stats)
    _assert_same((y.reshape(x.shape), jax.tree.map(lambda a: a[0], stats)), _single_device(x))


def test_pmap_with_unequal_unmasked_counts_is_count_weighted():
    x = _batch(seed=1)
    # device d keeps d % PER_DEVICE + 1 rows (device 3 keeps all four, device 0 only one)
    keep = (np.arange(DEVICES * PER_DEVICE) % PER_DEVICE) <= (
        np.arange(DEVICES * PER_DEVICE) // PER_DEVICE
    ) % PER_DEVICE
    mask = keep[:, None, None]
    apply = jax.pmap(
        lambda xb, mb: _synced().apply(_variables(), xb, mask=mb, mutable=["batch_stats"]),
        axis_name="batch",
    )
    y, stats = apply(_per_device(x), _per_device(mask))
    y_ref, stats_ref = _single_device(x, mask)
    np.testing.assert_allclose(y.reshape(x.shape)[keep], y_ref[keep], rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6),
                 stats, stats_ref)


def test_shard_map_with_axis_name_equals_one_device():
    x = _batch()
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("batch",))
    apply = jax.jit(
        jax.shard_map(
            lambda xb: _synced().apply(_variables(), xb, mutable=["batch_stats"]),
            mesh=mesh,
            in_specs=P("batch"),
            out_specs=(P("batch"), P()),
        )
    )
    _assert_same(apply(x), _single_device(x))


def test_linen_vmap_with_axis_name_equals_one_device():
    x = _batch()
    mapped = nn.vmap(
        jl.BatchNorm,
        in_axes=0,
        out_axes=0,
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        axis_name="batch",
    )(use_running_average=False, axis_name="batch", **SETTINGS)
    y, stats = jax.jit(functools.partial(mapped.apply, mutable=["batch_stats"]))(
        _variables(), _per_device(x)
    )
    _assert_same((y.reshape(x.shape), stats), _single_device(x))


def test_jit_over_a_named_sharding_batch_equals_one_device():
    x = _batch()
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("batch",))
    sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
    assert len(sharded.sharding.device_set) == DEVICES
    y, stats = _single_device(sharded)
    _assert_same((y, stats), _single_device(x))


def test_nnx_batch_norm_in_shard_map_equals_one_device():
    x = _batch()
    variables = _variables()
    model = jx.BatchNorm(4, axis_name="batch", **SETTINGS, rngs=nnx.Rngs(0))
    for name, value in {**variables["params"], **variables["batch_stats"]}.items():
        getattr(model, name)[...] = value
    graphdef, state = nnx.split(model)
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("batch",))

    def apply(state, xb):
        module = nnx.merge(graphdef, state)
        y = module(xb)
        return y, nnx.state(module, nnx.BatchStat)

    y, stats = jax.jit(
        jax.shard_map(apply, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
    )(state, x)
    y_ref, stats_ref = _single_device(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["mean"][...], stats_ref["batch_stats"]["mean"], rtol=1e-5)
    np.testing.assert_allclose(stats["var"][...], stats_ref["batch_stats"]["var"], rtol=1e-5)


def test_pmap_axis_index_groups_normalize_each_group_of_devices_alone():
    x = _batch(seed=2)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    apply = jax.pmap(
        lambda xb: _synced(axis_index_groups=groups).apply(
            _variables(), xb, mutable=["batch_stats"]
        ),
        axis_name="batch",
    )
    y, stats = apply(_per_device(x))
    half = DEVICES * PER_DEVICE // 2
    for first_device, rows in ((0, slice(0, half)), (4, slice(half, None))):
        _assert_same(
            (y.reshape(x.shape)[rows], jax.tree.map(lambda a, d=first_device: a[d], stats)),
            _single_device(x[rows]),
        )


@pytest.mark.parametrize("virtual_batch_size", [2, PER_DEVICE])
def test_ghost_batches_with_axis_name_equal_one_device(virtual_batch_size):
    # Ghost batches are consecutive examples of the global batch, so each lies on one
    # device: syncing must not pool ghost batch g of every device into one.
    x = _batch(seed=3)

    def ghost(**kwargs):
        return jl.BatchNorm(
            use_running_average=False, virtual_batch_size=virtual_batch_size, **SETTINGS,
            **kwargs,
        )

    reference = jax.jit(functools.partial(ghost().apply, mutable=["batch_stats"]))(
        _variables(), x
    )
    apply = jax.pmap(
        lambda xb: ghost(axis_name="batch").apply(_variables(), xb, mutable=["batch_stats"]),
        axis_name="batch",
    )
    y, stats = apply(_per_device(x))
    _assert_same((y.reshape(x.shape), jax.tree.map(lambda a: a[0], stats)), reference)


def test_nnx_ghost_batches_in_shard_map_equal_one_device():
    x = _batch(seed=4)
    variables = _variables()

    def ghost(**kwargs):
        model = jx.BatchNorm(4, virtual_batch_size=2, **SETTINGS, **kwargs, rngs=nnx.Rngs(0))
        for name, value in {**variables["params"], **variables["batch_stats"]}.items():
            getattr(model, name)[...] = value
        return model

    reference = ghost()
    y_ref = reference(x)
    graphdef, state = nnx.split(ghost(axis_name="batch"))
    mesh = Mesh(np.array(jax.devices()[:DEVICES]), ("batch",))

    def apply(state, xb):
        module = nnx.merge(graphdef, state)
        return module(xb), nnx.state(module, nnx.BatchStat)

    y, stats = jax.jit(
        jax.shard_map(apply, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
    )(state, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["mean"][...], reference.mean[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"][...], reference.var[...], rtol=1e-5, atol=1e-6)
