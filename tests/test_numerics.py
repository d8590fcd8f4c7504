"""Statistics that are right: stable variance, half precision, masks, constants, dtypes,
evaluation mode and BatchNorm folding."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxnorm
from tests import reference


def _compiled(fn, *arrays, **static):
    """``fn(*arrays, **static)`` as one compiled program (one compile, not one per op)."""
    return jax.jit(partial(fn, **static))(*arrays)


def _rounded(values: np.ndarray, dtype) -> tuple[jax.Array, np.ndarray]:
    """``values`` in ``dtype`` and, for references, those same rounded values in float64."""
    x = jnp.asarray(values, dtype)
    return x, np.asarray(x.astype(jnp.float32), np.float64)


# ---------------------------------------------------------------- stable variance


def test_layer_norm_is_accurate_when_mean_is_ten_thousand_times_the_std():
    rng = np.random.default_rng(0)
    x, x64 = _rounded(1e4 + rng.normal(size=(16, 256)), jnp.float32)
    error = np.max(np.abs(np.asarray(_compiled(jaxnorm.layer_norm, x)) - reference.layer_norm(x64)))
    assert error < 5e-3


def test_batch_norm_is_accurate_when_mean_is_ten_thousand_times_the_std():
    rng = np.random.default_rng(1)
    x, x64 = _rounded(-1e4 + rng.normal(size=(512, 8)), jnp.float32)
    y, mean, var = _compiled(jaxnorm.batch_norm, x)
    ref_y, ref_mean, ref_var = reference.batch_norm(x64)
    assert np.max(np.abs(np.asarray(y) - ref_y)) < 5e-3
    np.testing.assert_allclose(np.asarray(var), ref_var, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(mean), ref_mean, rtol=1e-6)


def test_moments_variance_is_accurate_for_large_offset_under_a_mask():
    rng = np.random.default_rng(2)
    x, x64 = _rounded(3e4 + rng.normal(size=(4, 300)), jnp.float32)
    mask = rng.random((4, 300)) < 0.5
    _, var = _compiled(jaxnorm.moments, x, axes=1, mask=mask)
    expected = [np.var(row[keep]) for row, keep in zip(x64, mask, strict=True)]
    np.testing.assert_allclose(np.asarray(var), expected, rtol=2e-2)


# ---------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_half_precision_batch_norm_reduces_in_float32_and_returns_input_dtype(dtype):
    rng = np.random.default_rng(3)
    x, x64 = _rounded(2.0 + rng.normal(size=(64, 4, 6)), dtype)
    y, mean, var = _compiled(jaxnorm.batch_norm, x)
    assert y.dtype == dtype
    assert mean.dtype == var.dtype == jnp.float32
    ref_y, ref_mean, ref_var = reference.batch_norm(x64)
    np.testing.assert_allclose(np.asarray(mean), ref_mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(var), ref_var, rtol=1e-4)
    output_step = 2.0 ** -(8 if dtype == jnp.bfloat16 else 11)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, atol=4 * 4 * output_step)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_half_precision_moments_are_float32(dtype):
    x, x64 = _rounded(np.linspace(-3, 5, 96).reshape(8, 12), dtype)
    mean, var = _compiled(jaxnorm.moments, x, axes=(0, 1))
    assert mean.dtype == var.dtype == jnp.float32
    np.testing.assert_allclose([mean, var], [x64.mean(), x64.var()], rtol=1e-6)


FLOAT16_VARIANTS = {
    "batch_norm": (lambda x: jaxnorm.batch_norm(x)[0], lambda x: reference.batch_norm(x)[0]),
    "layer_norm": (jaxnorm.layer_norm, reference.layer_norm),
    "rms_norm": (jaxnorm.rms_norm, reference.rms_norm),
    "instance_norm": (jaxnorm.instance_norm, reference.instance_norm),
    "group_norm": (
        lambda x: jaxnorm.group_norm(x, num_groups=2),
        lambda x: reference.group_norm(x, num_groups=2),
    ),
    "local_response_norm": (
        lambda x: jaxnorm.local_response_norm(x, size=3, alpha=1.0),
        lambda x: reference.local_response_norm(x, size=3, alpha=1.0),
    ),
}


@pytest.mark.parametrize("variant", sorted(FLOAT16_VARIANTS))
def test_float16_input_near_60000_does_not_overflow(variant):
    """Squares of ~6e4 overflow float16 (max 65504): they must be taken in float32."""
    steps = np.random.default_rng(4).integers(-20, 20, size=(4, 3, 8))
    x, x64 = _rounded(60000.0 + 32.0 * steps, jnp.float16)  # float16's spacing there is 32
    fn, ref = FLOAT16_VARIANTS[variant]
    y = jax.jit(fn)(x)
    assert y.dtype == jnp.float16
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    np.testing.assert_allclose(np.asarray(y, np.float64), ref(x64), rtol=2e-3, atol=4e-3)


# ---------------------------------------------------------------- masks and constants


def test_fully_masked_moments_are_finite():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 6)), jnp.float32)
    mean, var = _compiled(jaxnorm.moments, x, axes=(0, 1), mask=jnp.zeros((4, 6), bool))
    assert np.isfinite(mean) and np.isfinite(var)
    assert var == 0


def test_batch_norm_with_a_fully_masked_batch_is_finite_in_value_and_gradient():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(5, 3)), jnp.float32)
    mask = jnp.zeros((5, 1), bool)

    def loss(x):
        y, mean, var = jaxnorm.batch_norm(x, jnp.ones(3), jnp.zeros(3), mask=mask)
        return jnp.sum(y * y) + jnp.sum(mean) + jnp.sum(var)

    value, grad = jax.jit(jax.value_and_grad(loss))(x)
    assert np.isfinite(value)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_a_fully_masked_channel_leaves_the_other_channels_exact():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    mask = np.ones((6, 3), bool)
    mask[:, 1] = False
    y, mean, var = _compiled(jaxnorm.batch_norm, x, mask=mask)
    assert np.all(np.isfinite(np.asarray(y)))
    ref_y, ref_mean, ref_var = reference.batch_norm(x)
    kept = [0, 2]
    np.testing.assert_allclose(np.asarray(mean)[kept], ref_mean[kept], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(var)[kept], ref_var[kept], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y)[:, kept], ref_y[:, kept], atol=1e-5)


def test_masked_out_rows_do_not_change_the_statistics_of_the_kept_rows():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(10, 4)).astype(np.float32)
    keep = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], bool)
    garbage = x.copy()
    garbage[~keep] = 1e6
    _, mean, var = _compiled(jaxnorm.batch_norm, garbage, mask=keep[:, None])
    _, kept_mean, kept_var = _compiled(jaxnorm.batch_norm, x[keep])
    np.testing.assert_allclose(mean, kept_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, kept_var, rtol=1e-5)


CONSTANT_INPUT_VARIANTS = {
    "batch_norm": lambda x, s, b: jaxnorm.batch_norm(x, s, b)[0],
    "layer_norm": lambda x, s, b: jaxnorm.layer_norm(x, s, b),
    "instance_norm": lambda x, s, b: jaxnorm.instance_norm(x, s, b),
    "group_norm": lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=2),
    "masked_layer_norm": lambda x, s, b: jaxnorm.layer_norm(x, s, b, mask=LAYER_NORM_MASK),
}
LAYER_NORM_MASK = np.arange(4) % 3 != 0


@pytest.mark.parametrize("variant", sorted(CONSTANT_INPUT_VARIANTS))
def test_constant_input_gives_exactly_bias_and_a_finite_zero_sum_gradient(variant):
    fn = CONSTANT_INPUT_VARIANTS[variant]
    scale = jnp.asarray([1.5, -2.0, 0.5, 3.0], jnp.float32)
    bias = jnp.asarray([0.25, -1.0, 7.0, 0.0], jnp.float32)
    # the normalized values (y - bias) / scale of the counted elements sum to zero over every
    # reduction set whatever x is, so their sum has zero gradient, up to the rounding of terms
    # as large as 1/sqrt(eps)
    counted = LAYER_NORM_MASK if variant.startswith("masked") else 1.0

    @jax.jit
    def output_and_gradients(x):
        y = fn(x, scale, bias)
        grad_of_sum = jax.grad(lambda x: jnp.sum(counted * (fn(x, scale, bias) - bias) / scale))
        grad_of_square = jax.grad(lambda x: jnp.sum(fn(x, scale, bias) ** 2))
        return y, grad_of_sum(x), grad_of_square(x)

    # binary-exact constants, and ones whose repeated sums round (-123.456, 0.1, 977.7)
    for constant in [0.0, 3.25, -1e4, -123.456, 0.1, 977.7]:
        x = jnp.full((3, 2, 4), constant, jnp.float32)
        y, grad_of_sum, grad_of_square = output_and_gradients(x)
        np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(np.asarray(bias), x.shape))
        np.testing.assert_allclose(np.asarray(grad_of_sum), 0.0, atol=1e-6 / np.sqrt(1e-6))
        assert np.all(np.isfinite(np.asarray(grad_of_square)))


def test_rms_norm_of_zeros_is_zero_with_finite_gradient():
    x = jnp.zeros((2, 5), jnp.float32)
    np.testing.assert_array_equal(_compiled(jaxnorm.rms_norm, x, jnp.full(5, 2.0)), 0.0)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(jaxnorm.rms_norm(x)))))(x)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_adaptive_instance_norm_of_constant_content_is_the_style_mean():
    content = jnp.full((2, 3, 3, 4), 5.0, jnp.float32)
    style = jnp.asarray(np.random.default_rng(9).normal(size=(2, 4, 2, 4)), jnp.float32)
    y = _compiled(jaxnorm.adaptive_instance_norm, content, style)
    style_mean = np.asarray(style).mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(np.asarray(y), np.broadcast_to(style_mean, y.shape), atol=1e-6)


# ---------------------------------------------------------------- dtype argument


def test_dtype_argument_sets_the_output_dtype():
    x = jnp.asarray(np.random.default_rng(10).normal(size=(4, 8)), jnp.float32)
    y = _compiled(jaxnorm.layer_norm, x, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(_compiled(jaxnorm.layer_norm, x)), atol=2e-2
    )
    y, mean, _ = jax.eval_shape(partial(jaxnorm.batch_norm, dtype=jnp.float16), x)
    assert (y.dtype, mean.dtype) == (jnp.float16, jnp.float32)
    grouped = jax.eval_shape(partial(jaxnorm.group_norm, num_groups=2, dtype=jnp.bfloat16), x)
    assert grouped.dtype == jnp.bfloat16


def test_output_dtype_defaults_to_the_promoted_input_and_parameter_dtype():
    x = jnp.ones((4, 8), jnp.bfloat16).at[0].set(2)
    assert jax.eval_shape(jaxnorm.layer_norm, x).dtype == jnp.bfloat16
    assert jax.eval_shape(jaxnorm.layer_norm, x, jnp.ones(8, jnp.float32)).dtype == jnp.float32
    assert jax.eval_shape(jaxnorm.rms_norm, x, jnp.ones(8, jnp.bfloat16)).dtype == jnp.bfloat16
    with_bias = jax.eval_shape(partial(jaxnorm.instance_norm, bias=jnp.ones(8)), x[:, None])
    assert with_bias.dtype == jnp.float32


# ---------------------------------------------------------------- evaluation mode


def test_batch_norm_inference_matches_normalize_with_the_given_statistics():
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
    mean, scale, bias = (jnp.asarray(rng.normal(size=5), jnp.float32) for _ in range(3))
    var = jnp.asarray(rng.uniform(0.1, 2.0, size=5), jnp.float32)
    y = jaxnorm.batch_norm_inference(x, mean, var, scale, bias, eps=1e-3)
    expected = jaxnorm.normalize(x, (0, 1), scale, bias, mean=mean, var=var, eps=1e-3)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_batch_norm_inference_with_the_batch_statistics_equals_training_mode():
    rng = np.random.default_rng(12)
    x = jnp.asarray(rng.normal(size=(6, 3, 4)), jnp.float32)
    scale, bias = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    y, mean, var = jaxnorm.batch_norm(x, scale, bias, axis=1)
    y_eval = jaxnorm.batch_norm_inference(x, mean, var, scale, bias, axis=1)
    np.testing.assert_allclose(y_eval, y, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- folding


def _bn_statistics(rng, channels):
    mean, scale, bn_bias = (jnp.asarray(rng.normal(size=channels), jnp.float32) for _ in "msb")
    var = jnp.asarray(rng.uniform(0.2, 3.0, size=channels), jnp.float32)
    return mean, var, scale, bn_bias


@pytest.mark.parametrize("with_bias", [True, False], ids=["conv-bias", "conv-no-bias"])
def test_folded_convolution_equals_batch_norm_of_the_convolution(with_bias):
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.normal(size=(2, 7, 7, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)  # HWIO
    bias = jnp.asarray(rng.normal(size=5), jnp.float32) if with_bias else None
    mean, var, scale, bn_bias = _bn_statistics(rng, 5)

    def conv(x, kernel, bias):
        y = lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y if bias is None else y + bias

    expected = jaxnorm.batch_norm_inference(conv(x, kernel, bias), mean, var, scale, bn_bias)
    folded_kernel, folded_bias = jaxnorm.fold_batch_norm(kernel, bias, mean, var, scale, bn_bias)
    np.testing.assert_allclose(conv(x, folded_kernel, folded_bias), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False], ids=["dense-bias", "dense-no-bias"])
def test_folded_dense_layer_equals_batch_norm_of_the_dense_layer(with_bias):
    rng = np.random.default_rng(14)
    x = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=4), jnp.float32) if with_bias else None
    mean, var, scale, bn_bias = _bn_statistics(rng, 4)
    layer_output = x @ kernel + (0 if bias is None else bias)
    expected = jaxnorm.batch_norm_inference(layer_output, mean, var, scale, bn_bias, eps=1e-3)
    folded_kernel, folded_bias = jaxnorm.fold_batch_norm(
        kernel, bias, mean, var, scale, bn_bias, eps=1e-3
    )
    np.testing.assert_allclose(x @ folded_kernel + folded_bias, expected, atol=1e-4, rtol=1e-5)


def test_folding_without_scale_and_bias_uses_identity_affine():
    rng = np.random.default_rng(15)
    kernel = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    mean, var, _, _ = _bn_statistics(rng, 3)
    folded_kernel, folded_bias = jaxnorm.fold_batch_norm(kernel, None, mean, var)
    expected = (np.asarray(x @ kernel) - np.asarray(mean)) / np.sqrt(np.asarray(var) + 1e-5)
    np.testing.assert_allclose(x @ folded_kernel + folded_bias, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("axes", [(0,), (1,)])
def test_fast_variance_is_the_textbook_one_pass_formula(axes):
    # Well-conditioned data: the same statistics as the stable path. With an offset of 1e4
    # (float32): exactly E[x²] − E[x]², cancellation included, while the default is exact.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    fast = jaxnorm.moments(x, axes, fast_variance=True)
    stable = jaxnorm.moments(x, axes)
    for a, b in zip(fast, stable, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    shifted = jnp.asarray(x + 1e4)
    mean, var = jaxnorm.moments(shifted, axes, fast_variance=True)
    textbook = jnp.maximum(jnp.mean(shifted * shifted, axes) - jnp.mean(shifted, axes) ** 2, 0)
    np.testing.assert_allclose(mean, jnp.mean(shifted, axes), rtol=1e-6)
    np.testing.assert_allclose(var, textbook, rtol=1e-3, atol=1e-3)
    exact = np.asarray(shifted, np.float64).var(axes)
    assert np.max(np.abs(np.asarray(var) - exact)) > 1.0
    np.testing.assert_allclose(jaxnorm.moments(shifted, axes)[1], exact, rtol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_constant_sets_give_exactly_bias_for_any_constant_and_length(dtype):
    # The first-pass mean of n copies of c rounds (in float32: n * c is not exact); the
    # refinement pass (or, for half precision, the exact float32 sum) must remove that, or
    # the rounding is amplified by 1/sqrt(eps) into an output far from the bias.
    rng = np.random.default_rng(11)
    bias = jnp.asarray(rng.normal(size=12), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 6.0, 12), jnp.float32)
    variants = [
        lambda x: jaxnorm.layer_norm(x, scale, bias),
        lambda x: jaxnorm.instance_norm(x, scale, bias),
        lambda x: jaxnorm.group_norm(x, scale, bias, num_groups=3),
        lambda x: jaxnorm.batch_norm(x, scale, bias)[0],
        lambda x: jaxnorm.layer_norm(x, scale, bias, reduction_axes=(1, 2), feature_axes=2),
    ]
    compiled = [jax.jit(fn) for fn in variants]
    constants = [*rng.uniform(-1e3, 1e3, 8), 3333.3333, 5e4, -7.77]
    for constant in constants:
        for shape in [(3, 7, 12), (2, 1000, 12)]:
            x = jnp.full(shape, constant, dtype)
            for fn in compiled:
                y = np.asarray(fn(x), np.float32)
                np.testing.assert_array_equal(y, np.broadcast_to(np.asarray(bias), shape))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("width", [7, 13, 15, 63, 255, 256, 500, 768, 1000, 2000])
def test_half_precision_constant_rows_give_exactly_bias_at_any_width(dtype, width):
    # XLA compiles the mean's division by n as a multiplication by 1/n, which rounds for
    # any n but a power of two: a constant row of 5e4 then came out near +-1, not bias.
    constants = jnp.asarray([3333.3333, 5e4, -7.77, 1 / 3, 0.1, 123.456, 1e-3, -0.7])
    x = jnp.broadcast_to(constants[:, None], (8, width)).astype(dtype)
    bias = jnp.linspace(-1.0, 1.0, width)
    for scale in (None, jnp.linspace(0.5, 2.0, width).astype(dtype)):
        y = jax.jit(jaxnorm.layer_norm)(x, scale, bias.astype(dtype))
        expected = np.broadcast_to(np.asarray(bias.astype(dtype), np.float32), y.shape)
        np.testing.assert_array_equal(np.asarray(y, np.float32), expected)
