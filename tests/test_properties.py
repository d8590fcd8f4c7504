"""Property tests over random shapes, axes and dtypes (hypothesis).

Configurations come from small sets (sizes 2-4, ranks 1-4) and the functions are jit-compiled
with their axis arguments static, so repeated configurations reuse a compiled program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jaxnorm

SETTINGS = settings(deadline=None, max_examples=10, derandomize=True)

normalize = jax.jit(jaxnorm.normalize, static_argnames=("reduction_axes", "feature_axes", "eps"))
moments = jax.jit(jaxnorm.moments, static_argnames="axes")
layer_norm = jax.jit(jaxnorm.layer_norm, static_argnames=("reduction_axes", "feature_axes", "eps"))
rms_norm = jax.jit(jaxnorm.rms_norm, static_argnames=("reduction_axes", "feature_axes", "eps"))
group_norm = jax.jit(jaxnorm.group_norm, static_argnames=("num_groups", "feature_axis", "eps"))
instance_norm = jax.jit(jaxnorm.instance_norm, static_argnames=("feature_axes", "eps"))

# how far a normalized output may be from exact, by dtype (outputs come back in that dtype)
OUTPUT_TOLERANCE = {jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}


@st.composite
def shapes_and_axes(draw, min_rank: int = 1, max_rank: int = 4):
    """A shape with sizes 2-4 and a non-empty set of its axes, some written negative."""
    rank = draw(st.integers(min_rank, max_rank))
    shape = tuple(draw(st.lists(st.integers(2, 4), min_size=rank, max_size=rank)))
    axes = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    return shape, tuple(a - rank if draw(st.booleans()) else a for a in axes)


def _normal(seed: int, shape: tuple[int, ...], offset: float = 0.0, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    return (offset + spread * rng.normal(size=shape)).astype(np.float32)


@SETTINGS
@given(
    shapes_and_axes(),
    st.sampled_from([jnp.float32, jnp.float16, jnp.bfloat16]),
    st.floats(-50, 50),
    st.floats(0.5, 20),
    st.integers(0, 2**16),
)
def test_normalize_gives_zero_mean_and_unit_variance_over_the_reduction_set(
    shape_and_axes, dtype, offset, spread, seed
):
    shape, axes = shape_and_axes
    x = jnp.asarray(_normal(seed, shape, offset, spread), dtype)
    # rounding to half precision can make a small reduction set constant: nothing to scale
    assume(np.all(np.asarray(x.astype(jnp.float32)).var(axis=axes) > 0))
    y = normalize(x, axes, eps=0.0)
    assert y.dtype == dtype
    y64 = np.asarray(y.astype(jnp.float32), np.float64)
    tolerance = OUTPUT_TOLERANCE[dtype]
    np.testing.assert_allclose(y64.mean(axis=axes), 0.0, atol=tolerance)
    np.testing.assert_allclose(y64.var(axis=axes), 1.0, atol=4 * tolerance)


@SETTINGS
@given(shapes_and_axes(), st.integers(0, 2**16), st.booleans())
def test_moments_match_float64_numpy_on_the_kept_elements(shape_and_axes, seed, masked):
    shape, axes = shape_and_axes
    x = _normal(seed, shape, offset=3.0)
    rng = np.random.default_rng(seed + 1)
    mask = rng.random(shape) < 0.6 if masked else np.ones(shape, bool)
    mean, var = moments(jnp.asarray(x), axes, mask=jnp.asarray(mask) if masked else None)
    x64 = x.astype(np.float64)
    count = mask.sum(axis=axes)
    safe = np.maximum(count, 1)
    expected_mean = np.where(mask, x64, 0).sum(axis=axes) / safe
    centred = x64 - np.expand_dims(expected_mean, tuple(a % len(shape) for a in axes))
    expected_var = np.where(mask, centred**2, 0).sum(axis=axes) / safe
    assert np.all(np.isfinite(np.asarray(mean))) and np.all(np.isfinite(np.asarray(var)))
    counted = count > 0  # a fully masked set has no defined statistics, only finite ones
    np.testing.assert_allclose(np.asarray(mean)[counted], expected_mean[counted], rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(var)[counted], expected_var[counted], rtol=1e-4, atol=1e-6
    )


@st.composite
def channel_layouts(draw):
    """``(shape, feature_axis)``: rank 2-4, batch first, the channel axis anywhere after it."""
    rank = draw(st.integers(2, 4))
    shape = list(draw(st.lists(st.integers(2, 4), min_size=rank, max_size=rank)))
    feature_axis = draw(st.integers(1, rank - 1))
    shape[feature_axis] = draw(st.sampled_from([2, 4, 6]))
    return tuple(shape), feature_axis


@SETTINGS
@given(channel_layouts(), st.integers(0, 2**16))
def test_group_norm_with_one_group_equals_layer_norm_over_all_non_batch_axes(layout, seed):
    shape, feature_axis = layout
    x = _normal(seed, shape, offset=1.0)
    scale, bias = _normal(seed + 1, (2, shape[feature_axis]))
    y = group_norm(x, scale, bias, num_groups=1, feature_axis=feature_axis)
    expected = layer_norm(
        x,
        scale,
        bias,
        reduction_axes=tuple(range(1, len(shape))),
        feature_axes=feature_axis,
    )
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(channel_layouts(), st.integers(0, 2**16))
def test_group_norm_with_one_group_per_channel_equals_instance_norm(layout, seed):
    shape, feature_axis = layout
    if len(shape) == 2:  # InstanceNorm of (N, C) reduces over nothing: only rank >= 3
        shape = shape + (3,)
    x = _normal(seed, shape, offset=-2.0)
    scale, bias = _normal(seed + 1, (2, shape[feature_axis]))
    y = group_norm(x, scale, bias, num_groups=shape[feature_axis], feature_axis=feature_axis)
    expected = instance_norm(x, scale, bias, feature_axes=feature_axis)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(shapes_and_axes(min_rank=2), st.floats(0.1, 100), st.floats(-100, 100), st.integers(0, 99))
def test_layer_norm_ignores_a_positive_rescaling_and_a_shift_of_its_input(
    shape_and_axes, factor, shift, seed
):
    shape, axes = shape_and_axes
    x = _normal(seed, shape)
    y = layer_norm(x, reduction_axes=axes, feature_axes=axes, eps=0.0)
    moved = layer_norm(factor * x + shift, reduction_axes=axes, feature_axes=axes, eps=0.0)
    np.testing.assert_allclose(np.asarray(moved), np.asarray(y), atol=2e-3)


@SETTINGS
@given(shapes_and_axes(), st.integers(0, 2**16))
def test_rms_norm_equals_layer_norm_of_zero_mean_input(shape_and_axes, seed):
    shape, axes = shape_and_axes
    x = _normal(seed, shape)
    x = x - x.mean(axis=axes, keepdims=True, dtype=np.float64).astype(np.float32)
    y = rms_norm(x, reduction_axes=axes, feature_axes=axes)
    expected = layer_norm(x, reduction_axes=axes, feature_axes=axes)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-4, atol=1e-4)


VARIANTS = {
    "batch_norm": lambda x: jaxnorm.batch_norm(x, mask=x > -1.0)[0],
    "layer_norm": lambda x: jaxnorm.layer_norm(x, reduction_axes=(1, 2), feature_axes=2),
    "rms_norm": lambda x: jaxnorm.rms_norm(x),
    "instance_norm": lambda x: jaxnorm.instance_norm(x),
    "group_norm": lambda x: jaxnorm.group_norm(x, num_groups=2, feature_axis=1),
    "local_response_norm": lambda x: jaxnorm.local_response_norm(x, size=3, alpha=0.5),
    "adaptive_instance_norm": lambda x: jaxnorm.adaptive_instance_norm(x, 2 * x[::-1] + 1),
}


@settings(deadline=None, max_examples=7, derandomize=True)
@given(
    st.sampled_from(sorted(VARIANTS)),
    st.sampled_from([(2, 4, 3), (3, 2, 2)]),  # few shapes: eager mode compiles every op
    st.integers(0, 2**16),
)
def test_jit_equals_eager(variant, shape, seed):
    x = jnp.asarray(_normal(seed, shape, offset=0.5))
    fn = VARIANTS[variant]
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x)), np.asarray(fn(x)), rtol=2e-6, atol=2e-6)
