"""Cross-device statistics on 8 host CPU devices (set up in ``conftest.py``).

Under ``pmap``, ``shard_map`` and ``vmap`` with an ``axis_name``, every member must get the
statistics of the concatenated batch, also when members hold different numbers of unmasked
elements (some none at all). ``axis_index_groups`` is not implemented by JAX's ``shard_map``
and ``vmap`` collectives (``NotImplementedError``), so it is tested under ``pmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
from tests import reference

DEVICES = 8
PER_DEVICE = 4
CHANNELS = 3
GROUPS = [[0, 1, 2, 3], [4, 5, 6, 7]]

pytestmark = pytest.mark.skipif(
    jax.device_count() < DEVICES, reason="needs 8 (host) devices, see conftest.py"
)


def _sharded_batch(seed: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A ``(devices, per_device, channels)`` float32 batch and an unequal mask over examples:
    devices 2 and 5 hold no unmasked example, the others between one and four."""
    rng = np.random.default_rng(seed)
    x = (offset + rng.normal(size=(DEVICES, PER_DEVICE, CHANNELS))).astype(np.float32)
    kept_per_device = [4, 1, 0, 3, 2, 0, 4, 1]
    mask = np.arange(PER_DEVICE)[None, :] < np.asarray(kept_per_device)[:, None]
    return x, mask[..., None]


def _concatenated(values: np.ndarray, devices=range(DEVICES)) -> np.ndarray:
    return np.concatenate([values[d] for d in devices], axis=0)


def _assert_every_member_has(actual, expected, **tolerance) -> None:
    actual = np.asarray(actual)
    for member in actual:
        np.testing.assert_allclose(member, expected, **tolerance)


TOLERANCE = {"rtol": 2e-5, "atol": 2e-6}


# ---------------------------------------------------------------- pmap


def test_pmap_moments_equal_the_moments_of_the_concatenated_batch():
    x, _ = _sharded_batch(0)
    mean, var = jax.pmap(lambda x: jaxnorm.moments(x, 0, axis_name="devices"), "devices")(x)
    whole = _concatenated(x).astype(np.float64)
    _assert_every_member_has(mean, whole.mean(0), **TOLERANCE)
    _assert_every_member_has(var, whole.var(0), **TOLERANCE)


def test_pmap_batch_norm_with_unequal_masks_equals_the_concatenated_batch():
    x, mask = _sharded_batch(1)
    scale = np.asarray([1.0, -2.0, 0.5], np.float32)
    bias = np.asarray([0.0, 1.0, -3.0], np.float32)

    def step(x, mask):
        return jaxnorm.batch_norm(x, scale, bias, mask=mask, axis_name="devices")

    y, mean, var = jax.pmap(step, "devices")(x, mask)
    ref_y, ref_mean, ref_var = reference.batch_norm(
        _concatenated(x), scale, bias, mask=_concatenated(mask)
    )
    _assert_every_member_has(mean, ref_mean, **TOLERANCE)
    _assert_every_member_has(var, ref_var, **TOLERANCE)
    np.testing.assert_allclose(_concatenated(np.asarray(y)), ref_y, rtol=1e-4, atol=1e-4)


def test_pmap_mean_is_count_weighted_not_a_mean_of_device_means():
    """Device 0 holds three ones, device 1 one nine: the batch mean is 3, not (1 + 9) / 2."""
    x = np.zeros((DEVICES, 3, 1), np.float32)
    x[0], x[1] = 1.0, 9.0
    mask = np.zeros((DEVICES, 3, 1), bool)
    mask[0] = True
    mask[1, 0] = True
    mean, var = jax.pmap(
        lambda x, m: jaxnorm.moments(x, (0, 1), mask=m, axis_name="devices"), "devices"
    )(x, mask)
    _assert_every_member_has(mean, 3.0, rtol=1e-6)
    _assert_every_member_has(var, 12.0, rtol=1e-6)  # (3 * 4 + 36) / 4


def test_pmap_statistics_stay_accurate_at_a_large_offset():
    x, mask = _sharded_batch(2, offset=1e4)
    x[3] += 5.0  # devices disagree on their local means
    _, mean, var = jax.pmap(
        lambda x, m: jaxnorm.batch_norm(x, mask=m, axis_name="devices"), "devices"
    )(x, mask)
    kept = _concatenated(x).astype(np.float64)[_concatenated(mask)[:, 0]]
    _assert_every_member_has(mean, kept.mean(0), rtol=1e-7)
    _assert_every_member_has(var, kept.var(0), rtol=1e-3)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_pmap_axis_index_groups_equal_separate_concatenations(masked):
    x, mask = _sharded_batch(3)
    mask = mask if masked else np.ones_like(mask)

    def step(x, mask):
        return jaxnorm.moments(x, 0, mask=mask, axis_name="devices", axis_index_groups=GROUPS)

    mean, var = jax.pmap(step, "devices")(x, mask)
    for group in GROUPS:
        kept = _concatenated(x, group).astype(np.float64)
        kept = kept[_concatenated(mask, group)[:, 0]]
        _assert_every_member_has(mean[np.asarray(group)], kept.mean(0), **TOLERANCE)
        _assert_every_member_has(var[np.asarray(group)], kept.var(0), **TOLERANCE)


def test_pmap_group_with_no_unmasked_element_has_finite_statistics():
    x, _ = _sharded_batch(4)
    mask = np.zeros((DEVICES, PER_DEVICE, 1), bool)
    mask[:4] = True  # the second group is fully masked
    y, mean, var = jax.pmap(
        lambda x, m: jaxnorm.batch_norm(x, mask=m, axis_name="devices", axis_index_groups=GROUPS),
        "devices",
    )(x, mask)
    assert np.all(np.isfinite(np.asarray(y))) and np.all(np.isfinite(np.asarray(mean)))
    np.testing.assert_array_equal(np.asarray(var)[4:], 0.0)
    _assert_every_member_has(mean[:4], _concatenated(x, GROUPS[0]).mean(0), **TOLERANCE)
    _assert_every_member_has(
        var[:4], _concatenated(x, GROUPS[0]).astype(np.float64).var(0), **TOLERANCE
    )


# ---------------------------------------------------------------- shard_map


def _shard_map(fn, in_specs, out_specs):
    mesh = jax.make_mesh((DEVICES,), ("devices",))
    mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))

    def run(*arrays):
        placed = [
            jax.device_put(a, NamedSharding(mesh, spec))
            for a, spec in zip(arrays, in_specs, strict=True)
        ]
        return mapped(*placed)

    return run


def test_shard_map_moments_equal_the_moments_of_the_whole_array():
    x, mask = _sharded_batch(5)
    run = _shard_map(
        lambda x, m: jaxnorm.moments(x, 0, mask=m, axis_name="devices"),
        in_specs=(P("devices"), P("devices")),
        out_specs=(P(), P()),
    )
    mean, var = run(_concatenated(x), _concatenated(mask))
    kept = _concatenated(x).astype(np.float64)[_concatenated(mask)[:, 0]]
    np.testing.assert_allclose(np.asarray(mean), kept.mean(0), **TOLERANCE)
    np.testing.assert_allclose(np.asarray(var), kept.var(0), **TOLERANCE)


def test_shard_map_batch_norm_equals_unsharded_batch_norm():
    x, mask = _sharded_batch(6)
    whole_x, whole_mask = _concatenated(x), _concatenated(mask)
    run = _shard_map(
        lambda x, m: jaxnorm.batch_norm(x, mask=m, axis_name="devices"),
        in_specs=(P("devices"), P("devices")),
        out_specs=(P("devices"), P(), P()),
    )
    y, mean, var = run(whole_x, whole_mask)
    ref_y, ref_mean, ref_var = jaxnorm.batch_norm(jnp.asarray(whole_x), mask=whole_mask)
    np.testing.assert_allclose(np.asarray(mean), ref_mean, **TOLERANCE)
    np.testing.assert_allclose(np.asarray(var), ref_var, **TOLERANCE)
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-4, atol=1e-4)


def test_shard_map_normalize_over_a_sharded_sequence_equals_layer_norm_of_the_whole():
    """Sequence parallelism: tokens sharded over devices, statistics over the whole axis."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, DEVICES * 3, 4)).astype(np.float32)
    run = _shard_map(
        lambda x: jaxnorm.normalize(x, (1, 2), feature_axes=2, axis_name="devices"),
        in_specs=(P(None, "devices"),),
        out_specs=P(None, "devices"),
    )
    expected = reference.layer_norm(x, reduction_axes=(1, 2), eps=1e-5)
    np.testing.assert_allclose(np.asarray(run(x)), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- vmap


def test_vmap_with_axis_name_equals_the_concatenated_batch():
    x, mask = _sharded_batch(8)

    def step(x, mask):
        return jaxnorm.batch_norm(x, mask=mask, axis_name="batch")

    y, mean, var = jax.jit(jax.vmap(step, axis_name="batch"))(x, mask)
    ref_y, ref_mean, ref_var = reference.batch_norm(_concatenated(x), mask=_concatenated(mask))
    _assert_every_member_has(mean, ref_mean, **TOLERANCE)
    _assert_every_member_has(var, ref_var, **TOLERANCE)
    np.testing.assert_allclose(_concatenated(np.asarray(y)), ref_y, rtol=1e-4, atol=1e-4)


def test_vmap_gradient_through_cross_member_statistics_matches_the_whole_batch():
    x, _ = _sharded_batch(9)
    target = np.random.default_rng(10).normal(size=x.shape).astype(np.float32)

    def loss_per_member(x, target):
        y, _, _ = jaxnorm.batch_norm(x, axis_name="batch")
        return jnp.sum((y - target) ** 2)

    def mapped_loss(x):
        return jnp.sum(jax.vmap(loss_per_member, axis_name="batch")(x, target))

    def whole_loss(x):
        y, _, _ = jaxnorm.batch_norm(x.reshape(-1, CHANNELS))
        return jnp.sum((y - target.reshape(-1, CHANNELS)) ** 2)

    np.testing.assert_allclose(
        jax.jit(jax.grad(mapped_loss))(x), jax.jit(jax.grad(whole_loss))(x), rtol=1e-4, atol=1e-5
    )


def test_pmap_fast_variance_is_count_weighted_too():
    x, mask = _sharded_batch(7, offset=2.0)
    mean, var = jax.pmap(
        lambda x, m: jaxnorm.moments(x, 0, mask=m, axis_name="devices", fast_variance=True),
        "devices",
    )(x, mask)
    kept = _concatenated(x)[_concatenated(mask)[:, 0]].astype(np.float64)
    _assert_every_member_has(mean, kept.mean(0), rtol=1e-5, atol=1e-5)
    _assert_every_member_has(var, kept.var(0), rtol=1e-4, atol=1e-5)


def test_pmap_statistics_stay_exact_with_an_outlier_and_a_large_offset():
    # One element 700 sigma out on an offset of 1e4: shifting every member by one data value
    # (the outlier) before a one-pass sum cancels; combining each member's own two-pass
    # statistics (Chan et al.) does not.
    rng = np.random.default_rng(12)
    x = (1e4 + rng.normal(size=(DEVICES, 4096, 1))).astype(np.float32)
    x[0, 0, 0] = 1e4 + 700
    mean, var = jax.pmap(lambda x: jaxnorm.moments(x, 0, axis_name="devices"), "devices")(x)
    whole = _concatenated(x).astype(np.float64)
    _assert_every_member_has(mean, whole.mean(0), rtol=1e-7)
    _assert_every_member_has(var, whole.var(0), rtol=1e-4)


def test_pmap_constant_input_gives_exactly_bias():
    x = np.full((DEVICES, PER_DEVICE, CHANNELS), -123.456, np.float32)
    mask = np.ones(x.shape, bool)
    mask[2] = False  # a member with nothing counted
    bias = np.asarray([0.5, -1.0, 2.0], np.float32)
    y, _, var = jax.pmap(
        lambda x, m: jaxnorm.batch_norm(x, None, bias, mask=m, axis_name="devices"), "devices"
    )(x, mask)
    np.testing.assert_array_equal(np.asarray(y)[mask], np.broadcast_to(bias, x.shape)[mask])
    _assert_every_member_has(var, np.zeros(CHANNELS), atol=0)


def test_vmap_gradients_with_unequal_masks_match_the_whole_masked_batch_in_both_modes():
    # float64: the cross-member merge (pmax shift, two psums) must differentiate exactly,
    # in reverse and forward mode, also for members with nothing counted.
    with jax.enable_x64(True):
        x, mask = _sharded_batch(13, offset=5.0)
        x = x.astype(np.float64)
        rng = np.random.default_rng(14)
        target = rng.normal(size=x.shape)
        scale, bias = rng.uniform(0.5, 2.0, CHANNELS), rng.normal(size=CHANNELS)

        def mapped_loss(x, scale, bias):
            def member(x, m, t):
                y, _, _ = jaxnorm.batch_norm(x, scale, bias, mask=m, axis_name="batch")
                return jnp.sum(jnp.where(m, (y - t) ** 2, 0))
            return jnp.sum(jax.vmap(member, axis_name="batch")(x, mask, target))

        def whole_loss(x, scale, bias):
            m = _concatenated(mask)
            y, _, _ = jaxnorm.batch_norm(x.reshape(-1, CHANNELS), scale, bias, mask=m)
            return jnp.sum(jnp.where(m, (y - target.reshape(-1, CHANNELS)) ** 2, 0))

        args = (jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
        for got, want in zip(jax.grad(mapped_loss, argnums=(0, 1, 2))(*args),
                             jax.grad(whole_loss, argnums=(0, 1, 2))(*args), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        direction = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in args)
        _, mapped_tangent = jax.jvp(mapped_loss, args, direction)
        _, whole_tangent = jax.jvp(whole_loss, args, direction)
        np.testing.assert_allclose(mapped_tangent, whole_tangent, rtol=1e-10)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_pmap_variance_keeps_single_device_accuracy_at_large_offsets(offset):
    # Member means rounded to ulp(offset) would swamp the between-member spread (~var/n);
    # statistics of x - pivot (a shared data value) keep it.
    rng = np.random.default_rng(15)
    x = (rng.normal(size=(DEVICES, 50, CHANNELS)) + offset).astype(np.float32)
    _, var = jax.pmap(lambda x: jaxnorm.moments(x, 0, axis_name="devices"), "devices")(x)
    whole = _concatenated(x).astype(np.float64)
    _assert_every_member_has(var, whole.var(0), rtol=5e-6)


def test_pmap_huge_values_with_an_empty_member_stay_finite():
    rng = np.random.default_rng(16)
    x = (3e19 * (1 + 1e-3 * rng.normal(size=(DEVICES, PER_DEVICE, CHANNELS)))).astype(np.float32)
    mask = np.ones(x.shape, bool)
    mask[5] = False
    mean, var = jax.pmap(
        lambda x, m: jaxnorm.moments(x, 0, mask=m, axis_name="devices"), "devices"
    )(x, mask)
    kept = _concatenated(x)[_concatenated(mask)[:, 0]].astype(np.float64)
    _assert_every_member_has(mean, kept.mean(0), rtol=1e-6)
    _assert_every_member_has(var, kept.var(0), rtol=1e-3)
