"""The statistics paths that ``lax.platform_dependent`` selects on GPU and TPU, run on CPU.

The test suite runs on CPU, where the dispatcher takes ``_cpu_moments``; GPU's fused row
reductions (``_refined_rows``) and two-stage strided sums (``_split_shifted``), TPU's merged
reduction (``_merged_moments``) and GroupNorm pivot (``_group_pivot_shifted``), and the
first-element shifted pass would otherwise go untested. Each must keep the numerics guarantees:
two-pass accuracy at |mean|/std = 1e4 and exact statistics for constant sets."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import _stats

ROWS = (64, 1000)


def _refined_rows(x, axes):
    return _stats._refined_rows(jnp.asarray(x, jnp.float32), axes)


def _group_pivot_shifted(x, axes):
    raw = jnp.asarray(x)
    return _stats._group_pivot_shifted(raw.astype(jnp.float32), raw, axes)


def _shifted_single_pass(x, axes):
    raw = jnp.asarray(x)
    return _stats._pivot_shifted(raw.astype(jnp.float32), raw, axes)


def _split_shifted(x, axes):
    raw = jnp.asarray(x)
    return _stats._split_shifted(raw.astype(jnp.float32), raw, axes)


def _merged(x, axes):
    return _stats._merged_moments(jnp.asarray(x), axes)


def _cpu_moments(x, axes):
    return _stats._cpu_moments(jnp.asarray(x, jnp.float32), axes)


PATHS = [
    pytest.param(_refined_rows, id="gpu-refined-rows"),
    pytest.param(_shifted_single_pass, id="gpu-tpu-shifted-single-pass"),
    pytest.param(_split_shifted, id="gpu-split-shifted"),
    pytest.param(_merged, id="tpu-merged"),
    pytest.param(_cpu_moments, id="cpu"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_every_backend_path_has_two_pass_accuracy_at_a_large_offset(path, offset):
    rng = np.random.default_rng(3)
    x = (offset + rng.normal(size=ROWS)).astype(np.float32)
    moments = path(x, (1,))
    exact = x.astype(np.float64)
    np.testing.assert_allclose(np.asarray(moments.mean)[:, 0], exact.mean(1), rtol=1e-7,
                               atol=1e-3 * max(offset, 1) * 1e-3)
    np.testing.assert_allclose(np.asarray(moments.var)[:, 0], exact.var(1), rtol=2e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("width", [7, 200, 1000])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_every_backend_path_is_exact_for_constant_rows(path, width, dtype):
    constants = np.asarray([-123.456, 0.1, 987.0, 3.3e-3], np.float32)
    x = jnp.asarray(np.repeat(constants[:, None], width, axis=1)).astype(dtype)
    moments = path(x, (1,))
    np.testing.assert_array_equal(np.asarray(moments.mean)[:, 0],
                                  np.asarray(x[:, 0], np.float32))
    np.testing.assert_array_equal(np.asarray(moments.var)[:, 0], 0)


@pytest.mark.parametrize("path", PATHS)
def test_every_backend_path_reduces_several_trailing_axes(path):
    rng = np.random.default_rng(4)
    x = (5.0 + rng.normal(size=(3, 4, 300))).astype(np.float32)
    moments = path(x, (1, 2))
    exact = x.astype(np.float64).reshape(3, -1)
    np.testing.assert_allclose(np.asarray(moments.mean).reshape(3), exact.mean(1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(moments.var).reshape(3), exact.var(1), rtol=1e-5)


@pytest.mark.parametrize("path", [_shifted_single_pass, _cpu_moments, _refined_rows,
                                  _split_shifted, _merged],
                         ids=["shifted", "cpu", "gpu", "gpu-split", "tpu-merged"])
def test_empty_sets_give_zero_statistics_of_the_right_shape(path):
    moments = path(np.zeros((5, 0), np.float32), (1,))
    assert moments.mean.shape == moments.var.shape == (5, 1)
    np.testing.assert_array_equal(np.asarray(moments.var), 0)
    np.testing.assert_array_equal(np.asarray(moments.count), 0)


# (shape, axes): BatchNorm 7x7 (leading run of 3 axes, 1568 rows), InstanceNorm (a run of
# two after the batch axis), GroupNorm (a run, a kept group axis, then the group's channels)
# shapes that take the GPU chunk split (BatchNorm, InstanceNorm, GroupNorm's view)
STRIDED = [((32, 7, 7, 512), (0, 1, 2)), ((4, 32, 32, 64), (1, 2)),
           ((2, 32, 32, 32, 4), (1, 2, 4))]


@pytest.mark.parametrize("shape, axes", STRIDED)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_gpu_two_stage_sums_keep_two_pass_accuracy_on_strided_sets(shape, axes, offset):
    rng = np.random.default_rng(5)
    x = (offset + rng.normal(size=shape)).astype(np.float32)
    zero_pivot = jnp.zeros([1 if a in axes else n for a, n in enumerate(shape)])
    count, first, _ = _stats._split_shifted_sums(jnp.asarray(x), zero_pivot, axes)
    # the split is taken: the chunks' partial sums are added in one variadic reduce
    jaxpr = str(jax.make_jaxpr(lambda v: _stats._split_shifted_sums(v, zero_pivot, axes))(x))
    assert re.search(r"\breduce\[", jaxpr)
    moments = _split_shifted(x, axes)
    exact = x.astype(np.float64)
    np.testing.assert_allclose(np.asarray(first), exact.sum(axes, keepdims=True),
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(moments.mean), exact.mean(axes, keepdims=True),
                               rtol=1e-7, atol=1e-6 * max(offset, 1))
    np.testing.assert_allclose(np.asarray(moments.var), exact.var(axes, keepdims=True),
                               rtol=2e-4)
    assert np.asarray(count).ravel()[0] == exact.size // np.asarray(moments.mean).size


@pytest.mark.parametrize("path", [_split_shifted, _merged], ids=["gpu", "tpu"])
@pytest.mark.parametrize("shape, axes", STRIDED)
def test_strided_set_paths_are_exact_for_constant_sets(path, shape, axes):
    x = np.full(shape, -123.456, np.float32)
    moments = path(x, axes)
    np.testing.assert_array_equal(np.asarray(moments.mean), np.float32(-123.456))
    np.testing.assert_array_equal(np.asarray(moments.var), 0)


def test_gpu_statistics_free_variance_term_equals_the_factored_one():
    from jaxnorm import _derivative

    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
    scale = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
    rstd = jnp.asarray(rng.uniform(0.5, 2.0, size=(4, 1)), jnp.float32)
    dvar = jnp.asarray(rng.normal(size=(4, 1)), jnp.float32)
    factored = _derivative._factored_term(x, rstd, rstd * scale, dvar)
    free = _derivative._statistics_free_term(x, rstd, rstd * scale, dvar, scale=scale)
    np.testing.assert_allclose(np.asarray(free), np.asarray(factored), rtol=1e-6)
    expected = 0.5 * np.asarray(rstd, np.float64) ** 3 * np.asarray(dvar) * np.asarray(
        x) * np.asarray(scale)
    np.testing.assert_allclose(np.asarray(free), expected, rtol=1e-5)
    unscaled = _derivative._statistics_free_term(x, rstd, rstd, dvar, scale=None)
    np.testing.assert_allclose(np.asarray(unscaled),
                               np.asarray(_derivative._factored_term(x, rstd, rstd, dvar)),
                               rtol=1e-6)


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_tpu_group_tile_pivot_keeps_two_pass_accuracy(offset):
    # GroupNorm's (..., groups, channels per group) view: the pivot is the mean of each
    # group's channels at the first position, sliced from the merged channel axis
    rng = np.random.default_rng(7)
    shape, axes = (2, 16, 16, 32, 4), (1, 2, 4)
    x = (offset + rng.normal(size=shape)).astype(np.float32)
    tile = _stats._group_first_channels(jnp.asarray(x), axes)
    np.testing.assert_array_equal(np.asarray(tile), x[:, :1, :1, :, :])
    np.testing.assert_array_equal(np.asarray(_stats._set_pivots(jnp.asarray(x), axes)),
                                  x[:, :1, :1, :, :1])
    moments = _group_pivot_shifted(x, axes)
    exact = x.astype(np.float64)
    np.testing.assert_allclose(np.asarray(moments.pivot),
                               x[:, :1, :1, :, :].astype(np.float64).mean(4, keepdims=True),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(moments.mean), exact.mean(axes, keepdims=True),
                               rtol=1e-7, atol=1e-6 * max(offset, 1))
    np.testing.assert_allclose(np.asarray(moments.var), exact.var(axes, keepdims=True),
                               rtol=2e-4)


@pytest.mark.parametrize("with_offset", [True, False])
@pytest.mark.parametrize("shape, axes", STRIDED)
def test_gpu_chunked_per_set_terms_and_their_transpose_equal_the_direct_ones(
        shape, axes, with_offset):
    from jaxnorm import _derivative

    rng = np.random.default_rng(8)
    coefficient_shape = tuple(1 if a in axes else n for a, n in enumerate(shape))
    x_hat = jnp.asarray(rng.normal(size=shape), jnp.float32)
    slope = jnp.asarray(rng.normal(size=coefficient_shape), jnp.float32)
    offset = jnp.asarray(rng.normal(size=coefficient_shape), jnp.float32) if with_offset \
        else None
    plan = _stats.gpu_chunks(shape, axes)
    assert plan is not None  # these shapes take the chunk view on GPU

    def chunked(slope, offset):
        return _derivative._chunked_per_set_terms(x_hat, slope, offset, plan=plan)

    def direct(slope, offset):
        return _derivative._direct_per_set_terms(x_hat, slope, offset)

    np.testing.assert_allclose(np.asarray(chunked(slope, offset)),
                               np.asarray(direct(slope, offset)), rtol=1e-6, atol=1e-6)
    cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
    expected = jax.vjp(direct, slope, offset)[1](cotangent)
    got = jax.vjp(chunked, slope, offset)[1](cotangent)
    for g, e in zip(got, expected):
        if e is None:
            assert g is None
            continue
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-3)
    # the sums over the chunk and the chunks, against float64
    exact = (np.asarray(cotangent, np.float64) * np.asarray(x_hat)).sum(axes, keepdims=True)
    np.testing.assert_allclose(np.asarray(got[0]), exact, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_accelerator_output_from_x_hat_matches_the_cpu_form_and_keeps_bias_exact(dtype):
    from jaxnorm import _derivative

    rng = np.random.default_rng(9)
    x = jnp.asarray(3.0 + rng.normal(size=(4, 5, 6)), dtype)
    mean = jnp.asarray(x, jnp.float32).mean((0, 1), keepdims=True)
    rstd = jnp.asarray(rng.uniform(0.5, 2.0, size=(1, 1, 6)), jnp.float32)
    scale = jnp.asarray(rng.normal(size=(1, 1, 6)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(1, 1, 6)), jnp.float32)
    counted = jnp.asarray([[[True, True, False, True, True, False]]])
    rstd = jnp.where(counted, rstd, 0)
    got = _derivative._output_from_x_hat(x, mean, rstd, scale, bias, counted, dtype=dtype)
    cpu = _derivative._output_from_multiplier(x, mean, rstd, scale, bias, counted,
                                              dtype=dtype)
    exact = ((np.asarray(x, np.float64) - np.asarray(mean)) * np.asarray(rstd)
             * np.asarray(scale) + np.asarray(bias))
    tolerance = 1e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(cpu, np.float64),
                               rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=tolerance,
                               atol=tolerance)
    # sets with nothing counted output exactly bias
    np.testing.assert_array_equal(np.asarray(got)[..., [2, 5]],
                                  np.broadcast_to(np.asarray(bias.astype(dtype))[..., [2, 5]],
                                                  (4, 5, 2)))


@pytest.mark.parametrize("shape, axes", STRIDED)
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_tpu_merged_moments_keep_two_pass_accuracy_on_strided_sets(shape, axes, offset):
    rng = np.random.default_rng(10)
    x = (offset + rng.normal(size=shape)).astype(np.float32)
    moments = _merged(x, axes)
    exact = x.astype(np.float64)
    np.testing.assert_allclose(np.asarray(moments.mean), exact.mean(axes, keepdims=True),
                               rtol=1e-7, atol=1e-6 * max(offset, 1))
    np.testing.assert_allclose(np.asarray(moments.var), exact.var(axes, keepdims=True),
                               rtol=2e-4)
    np.testing.assert_array_equal(np.asarray(moments.count), exact.size // moments.mean.size)


def test_tpu_merged_moments_differentiate_and_batch_as_the_two_pass_formula():
    rng = np.random.default_rng(11)
    x = jnp.asarray(50.0 + rng.normal(size=(6, 5, 4)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(1, 5, 1)), jnp.float32)

    def loss(statistics, x):
        mean, var = statistics(x)
        return jnp.sum(weights * mean) + jnp.sum(weights * var)

    def merged(x):
        moments = _stats._merged_moments(x, (0, 2))
        return moments.mean, moments.var

    def two_pass(x):
        return jnp.mean(x, (0, 2), keepdims=True), jnp.var(x, (0, 2), keepdims=True)

    np.testing.assert_allclose(np.asarray(jax.grad(lambda v: loss(merged, v))(x)),
                               np.asarray(jax.grad(lambda v: loss(two_pass, v))(x)),
                               rtol=1e-4, atol=1e-5)
    tangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    got = jax.jvp(merged, (x,), (tangent,))[1]
    expected = jax.jvp(two_pass, (x,), (tangent,))[1]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-5)
    stacked = jnp.stack([x, 2 * x + 1])
    for b, e in zip(jax.vmap(merged)(stacked), jax.vmap(two_pass)(stacked)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_tpu_group_pivot_is_exact_for_constant_groups():
    shape, axes = STRIDED[2]  # GroupNorm's (..., groups, channels per group) view
    x = np.full(shape, -123.456, np.float32)
    moments = _group_pivot_shifted(x, axes)
    np.testing.assert_array_equal(np.asarray(moments.mean), np.float32(-123.456))
    np.testing.assert_array_equal(np.asarray(moments.var), 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("width", [768, 1000, 1024])
@pytest.mark.parametrize("offset", [0.0, 100.0, 3000.0])
def test_half_precision_rows_keep_two_pass_accuracy(dtype, width, offset):
    # Half-precision rows take the mean without a refining pass: exact sums, and for a
    # length that is not a power of two the mean snapped to the input's dtype when within
    # 2 * eps32 * |mean| of it. Either way the statistics match float64 of the same values.
    rng = np.random.default_rng(width)
    x = jnp.asarray(offset + rng.normal(size=(6, width)) * np.geomspace(1e-2, 1e2, 6)[:, None],
                    dtype)
    correction = _stats._mean_correction(dtype, x.shape, (1,))
    assert correction == ("none" if width == 1024 else "snap")
    moments = _stats._refined_rows(x.astype(jnp.float32), (1,), correction, dtype)
    exact = np.asarray(x, np.float64)
    np.testing.assert_allclose(np.asarray(moments.mean)[:, 0], exact.mean(1), rtol=2e-6,
                               atol=1e-7)
    # a snapped mean moves by d <= 4 float32 roundings, adding d**2 to the variance
    moved = (4 * np.finfo(np.float32).eps * np.abs(exact.mean(1))) ** 2
    error = np.abs(np.asarray(moments.var)[:, 0] - exact.var(1))
    assert np.all(error <= 1e-5 * exact.var(1) + moved), (error, exact.var(1), moved)


@pytest.mark.parametrize("outlier", [100.0, 1000.0, -1e4])
@pytest.mark.parametrize("path", ["pivot_shifted", "split_shifted"])
def test_an_outlier_first_element_does_not_cost_the_shifted_pass_its_accuracy(path, outlier):
    # BatchNorm-like strided sets of 200 704 values (64 x 56 x 56) whose first element
    # is far out: with it as the pivot the variance lost 0.15 % (100 sigma) to 3.5 % (1000
    # sigma); the median of the first three elements keeps the error at rounding level.
    rng = np.random.default_rng(11)
    x = rng.normal(size=(64, 56, 56, 8)).astype(np.float32)
    x[0, 0, 0, :] = outlier
    moments = (_shifted_single_pass if path == "pivot_shifted" else _split_shifted)(
        x, (0, 1, 2))
    exact = x.astype(np.float64)
    np.testing.assert_allclose(np.asarray(moments.pivot + moments.offset)[0, 0, 0],
                               exact.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(moments.var)[0, 0, 0], exact.var((0, 1, 2)),
                               rtol=2e-5)


def test_set_pivots_take_the_median_of_three_and_fall_back_to_the_first_element():
    x = jnp.asarray([[5.0, -100.0, 4.0, 1.0], [2.0, 2.0, 9.0, 2.0]])
    np.testing.assert_array_equal(_stats._set_pivots(x, (1,), median_from=4), [[4.0], [2.0]])
    # sets smaller than median_from (the default: 2**16 values) keep their first element
    np.testing.assert_array_equal(_stats._set_pivots(x, (1,)), [[5.0], [2.0]])
    np.testing.assert_array_equal(_stats._set_pivots(x, (0,), median_from=1),
                                  [[5.0, -100.0, 4.0, 1.0]])  # 2 elements: the first
    # the innermost reduction axis with three elements: axis 1 here, not the 2-long axis 2
    y = jnp.arange(24.0).reshape(2, 6, 2)
    np.testing.assert_array_equal(_stats._set_pivots(y, (1, 2), median_from=1), y[:, 1:2, :1])
    constant = jnp.full((3, 7), -2.5)
    np.testing.assert_array_equal(_stats._set_pivots(constant, (0, 1), median_from=1), [[-2.5]])
