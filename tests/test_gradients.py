"""``jax.vjp`` of every variant against the hand-derived float64 backward passes in
``tests/reference.py``, over several axis choices, both NHWC and NCHW layouts and masks;
plus ``check_grads`` to second order. All in float64, scoped by the ``x64`` fixture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnorm
from tests import reference

TOLERANCE = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(autouse=True)
def x64():
    """float64 for every test in this file only; restored afterwards."""
    with jax.enable_x64(True):
        yield


def _random(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for shape in shapes]


def _positive(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.5, 2.0, size=shape)


def _vjp(fn, primals, cotangent):
    """``(fn(*primals), vjp(cotangent))``, as one compiled program (far fewer compiles than
    running the backward pass op by op)."""

    def forward_and_backward(primals, cotangent):
        out, pullback = jax.vjp(fn, *primals)
        return out, pullback(cotangent)

    return jax.jit(forward_and_backward)(primals, cotangent)


def _assert_close(actual, expected) -> None:
    np.testing.assert_allclose(np.asarray(actual), expected, **TOLERANCE)


def _mask(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """A random mask with at least two kept elements per row of the first axis."""
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask.reshape(shape[0], -1)[:, :2] = True
    return mask


def test_gradient_test_runs_in_float64():
    assert jnp.asarray(np.ones(2)).dtype == jnp.float64


# ---------------------------------------------------------------- BatchNorm (training)

BATCH_NORM_LAYOUTS = [
    pytest.param((6, 4), -1, id="dense"),
    pytest.param((4, 3, 2, 5), -1, id="nhwc"),
    pytest.param((4, 5, 3, 2), 1, id="nchw"),
    pytest.param((3, 4, 2, 5), (1, 3), id="two-feature-axes"),
]


@pytest.mark.parametrize("shape, axis", BATCH_NORM_LAYOUTS)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_batch_norm_gradient_matches_hand_derived_formula(shape, axis, masked):
    features = tuple(shape[a] for a in sorted(np.atleast_1d(axis) % len(shape)))
    x, dy = _random(0, shape, shape)
    scale, bias, dmean, dvar = _random(1, features, features, features, features)
    mask = _mask(2, shape) if masked else None

    def fn(x, scale, bias):
        return jaxnorm.batch_norm(x, scale, bias, axis=axis, mask=mask, eps=1e-3)

    (y, mean, var), (dx, dscale, dbias) = _vjp(fn, (x, scale, bias), (dy, dmean, dvar))

    ref_y, ref_mean, ref_var = reference.batch_norm(x, scale, bias, axis=axis, mask=mask, eps=1e-3)
    ref_dx, ref_dscale, ref_dbias = reference.batch_norm_vjp(
        dy, x, scale, bias, axis=axis, mask=mask, eps=1e-3, dmean=dmean, dvar=dvar
    )
    for actual, expected in [
        (y, ref_y),
        (mean, ref_mean),
        (var, ref_var),
        (dx, ref_dx),
        (dscale, ref_dscale),
        (dbias, ref_dbias),
    ]:
        _assert_close(actual, expected)


@pytest.mark.parametrize("axis", [-1, 1], ids=["nhwc", "nchw"])
def test_batch_norm_inference_gradient_matches_hand_derived_formula(axis):
    shape = (3, 4, 2, 5)
    features = (shape[axis],)
    x, dy = _random(3, shape, shape)
    mean, scale, bias = _random(4, features, features, features)
    var = _positive(5, features)

    def fn(x, mean, var, scale, bias):
        return jaxnorm.batch_norm_inference(x, mean, var, scale, bias, axis=axis)

    y, grads = _vjp(fn, (x, mean, var, scale, bias), dy)
    _assert_close(y, reference.batch_norm_inference(x, mean, var, scale, bias, axis=axis))
    expected = reference.batch_norm_inference_vjp(dy, x, mean, var, scale, bias, axis=axis)
    for actual, want in zip(grads, expected, strict=True):
        _assert_close(actual, want)


# ---------------------------------------------------------------- LayerNorm / RMSNorm

NORM_AXES = [
    pytest.param(-1, -1, id="last-axis"),
    pytest.param((1, 2, 3), -1, id="all-but-batch-params-on-last"),
    pytest.param((1, 2, 3), (1, 2, 3), id="all-but-batch-params-everywhere"),
    pytest.param((2, 3), 1, id="nchw-spatial-params-on-channels"),
]


@pytest.mark.parametrize("reduction_axes, feature_axes", NORM_AXES)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_layer_norm_gradient_matches_hand_derived_formula(reduction_axes, feature_axes, masked):
    shape = (3, 4, 2, 5)
    features = tuple(shape[a] for a in sorted(np.atleast_1d(feature_axes) % 4))
    x, dy = _random(6, shape, shape)
    scale, bias = _random(7, features, features)
    mask = _mask(8, shape) if masked else None
    kwargs = {"reduction_axes": reduction_axes, "feature_axes": feature_axes, "mask": mask}

    def fn(x, scale, bias):
        return jaxnorm.layer_norm(x, scale, bias, **kwargs)

    y, grads = _vjp(fn, (x, scale, bias), dy)
    _assert_close(y, reference.layer_norm(x, scale, bias, **kwargs))
    for actual, want in zip(grads, reference.layer_norm_vjp(dy, x, scale, bias, **kwargs)):
        _assert_close(actual, want)


@pytest.mark.parametrize("reduction_axes, feature_axes", NORM_AXES)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_rms_norm_gradient_matches_hand_derived_formula(reduction_axes, feature_axes, masked):
    shape = (3, 4, 2, 5)
    features = tuple(shape[a] for a in sorted(np.atleast_1d(feature_axes) % 4))
    x, dy = _random(9, shape, shape)
    (scale,) = _random(10, features)
    mask = _mask(11, shape) if masked else None
    kwargs = {"reduction_axes": reduction_axes, "feature_axes": feature_axes, "mask": mask}

    y, grads = _vjp(lambda x, s: jaxnorm.rms_norm(x, s, **kwargs), (x, scale), dy)
    _assert_close(y, reference.rms_norm(x, scale, **kwargs))
    for actual, want in zip(grads, reference.rms_norm_vjp(dy, x, scale, **kwargs), strict=True):
        _assert_close(actual, want)


# ---------------------------------------------------------------- InstanceNorm / GroupNorm


@pytest.mark.parametrize(
    "shape, feature_axes",
    [
        pytest.param((3, 4, 2, 5), -1, id="nhwc"),
        pytest.param((3, 5, 4, 2), 1, id="nchw"),
        pytest.param((2, 6, 3), -1, id="sequence"),
    ],
)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_instance_norm_gradient_matches_hand_derived_formula(shape, feature_axes, masked):
    features = (shape[feature_axes],)
    x, dy = _random(12, shape, shape)
    scale, bias = _random(13, features, features)
    mask = _mask(14, shape) if masked else None
    kwargs = {"feature_axes": feature_axes, "mask": mask}

    def fn(x, scale, bias):
        return jaxnorm.instance_norm(x, scale, bias, **kwargs)

    y, grads = _vjp(fn, (x, scale, bias), dy)
    _assert_close(y, reference.instance_norm(x, scale, bias, **kwargs))
    for actual, want in zip(grads, reference.instance_norm_vjp(dy, x, scale, bias, **kwargs)):
        _assert_close(actual, want)


@pytest.mark.parametrize(
    "shape, feature_axis, groups",
    [
        pytest.param((3, 2, 4, 6), -1, {"num_groups": 2}, id="nhwc-2-groups"),
        pytest.param((3, 6, 4, 2), 1, {"num_groups": 3}, id="nchw-3-groups"),
        pytest.param((2, 5, 6), -1, {"num_groups": None, "group_size": 3}, id="group-size-3"),
    ],
)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_group_norm_gradient_matches_hand_derived_formula(shape, feature_axis, groups, masked):
    channels = shape[feature_axis]
    num_groups = groups.get("num_groups") or channels // groups["group_size"]
    x, dy = _random(15, shape, shape)
    scale, bias = _random(16, (channels,), (channels,))
    mask = _mask(17, shape) if masked else None

    def fn(x, scale, bias):
        return jaxnorm.group_norm(x, scale, bias, feature_axis=feature_axis, mask=mask, **groups)

    y, grads = _vjp(fn, (x, scale, bias), dy)
    kwargs = {"num_groups": num_groups, "feature_axis": feature_axis, "mask": mask}
    _assert_close(y, reference.group_norm(x, scale, bias, **kwargs))
    for actual, want in zip(grads, reference.group_norm_vjp(dy, x, scale, bias, **kwargs)):
        _assert_close(actual, want)


# ---------------------------------------------------------------- LRN / AdaIN


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("feature_axis", [-1, 1], ids=["nhwc", "nchw"])
def test_local_response_norm_gradient_matches_hand_derived_formula(size, feature_axis):
    shape = (2, 7, 3, 7)
    x, dy = _random(18, shape, shape)
    x = 3.0 * x  # large enough that the window term matters
    kwargs = {"size": size, "alpha": 0.5, "beta": 0.75, "k": 1.5, "feature_axis": feature_axis}

    y, (dx,) = _vjp(lambda x: jaxnorm.local_response_norm(x, **kwargs), (x,), dy)
    _assert_close(y, reference.local_response_norm(x, **kwargs))
    _assert_close(dx, reference.local_response_norm_vjp(dy, x, **kwargs))


@pytest.mark.parametrize(
    "content_shape, style_shape, feature_axes",
    [
        pytest.param((2, 4, 3, 5), (2, 2, 6, 5), -1, id="nhwc-other-spatial-size"),
        pytest.param((2, 5, 4, 3), (2, 5, 3, 3), 1, id="nchw"),
        pytest.param((3, 4, 3, 5), (1, 3, 3, 5), -1, id="one-style-for-the-batch"),
    ],
)
def test_adaptive_instance_norm_gradient_matches_hand_derived_formula(
    content_shape, style_shape, feature_axes
):
    content, style, dy = _random(19, content_shape, style_shape, content_shape)
    style = 2.0 * style + 1.0

    def fn(content, style):
        return jaxnorm.adaptive_instance_norm(content, style, feature_axes=feature_axes)

    y, (d_content, d_style) = _vjp(fn, (content, style), dy)
    kwargs = {"feature_axes": feature_axes}
    _assert_close(y, reference.adaptive_instance_norm(content, style, **kwargs))
    ref_d_content, ref_d_style = reference.adaptive_instance_norm_vjp(dy, content, style, **kwargs)
    _assert_close(d_content, ref_d_content)
    _assert_close(d_style, ref_d_style)


# ---------------------------------------------------------------- the references themselves


def _numerical_vjp(forward, primal: np.ndarray, cotangent: np.ndarray, step=1e-6) -> np.ndarray:
    """Central differences of ``<cotangent, forward(x)>`` with respect to ``x``."""
    grad = np.zeros_like(primal)
    for index in np.ndindex(primal.shape):
        bump = np.zeros_like(primal)
        bump[index] = step
        grad[index] = np.sum(cotangent * (forward(primal + bump) - forward(primal - bump)))
    return grad / (2 * step)


def test_reference_backward_formulas_agree_with_finite_differences():
    """The hand-derived formulas are checked independently of JAX, in plain NumPy."""
    shape = (3, 2, 4)
    x, dy, style = _random(20, shape, shape, (3, 3, 4))
    mask = _mask(21, shape)
    gamma, beta = _random(22, (4,), (4,))
    cases = [
        (
            lambda x: reference.batch_norm(x, gamma, beta, mask=mask)[0],
            reference.batch_norm_vjp(dy, x, gamma, beta, mask=mask)[0],
        ),
        (
            lambda x: reference.layer_norm(x, gamma, reduction_axes=(1, 2), mask=mask),
            reference.layer_norm_vjp(dy, x, gamma, reduction_axes=(1, 2), mask=mask)[0],
        ),
        (
            lambda x: reference.rms_norm(x, gamma, mask=mask),
            reference.rms_norm_vjp(dy, x, gamma, mask=mask)[0],
        ),
        (
            lambda x: reference.group_norm(x, gamma, num_groups=2),
            reference.group_norm_vjp(dy, x, gamma, num_groups=2)[0],
        ),
        (
            lambda x: reference.local_response_norm(2 * x, size=4, alpha=1.0),
            2 * reference.local_response_norm_vjp(dy, 2 * x, size=4, alpha=1.0),
        ),
        (
            lambda x: reference.adaptive_instance_norm(x, style),
            reference.adaptive_instance_norm_vjp(dy, x, style)[0],
        ),
    ]
    for forward, analytic in cases:
        np.testing.assert_allclose(analytic, _numerical_vjp(forward, x, dy), rtol=1e-6, atol=1e-7)
    numerical_d_style = _numerical_vjp(lambda s: reference.adaptive_instance_norm(x, s), style, dy)
    analytic_d_style = reference.adaptive_instance_norm_vjp(dy, x, style)[1]
    np.testing.assert_allclose(analytic_d_style, numerical_d_style, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- second order


SECOND_ORDER = {
    "batch_norm": lambda x, s, b: jaxnorm.batch_norm(x, s, b)[0],
    "batch_norm_masked": lambda x, s, b: jaxnorm.batch_norm(
        x, s, b, mask=jnp.arange(x.shape[0])[:, None, None] != 1
    )[0],
    "batch_norm_inference": lambda x, s, b: jaxnorm.batch_norm_inference(x, b, s * s + 0.5, s, b),
    "layer_norm": lambda x, s, b: jaxnorm.layer_norm(x, s, b),
    "rms_norm": lambda x, s, b: jaxnorm.rms_norm(x, s),
    "instance_norm": lambda x, s, b: jaxnorm.instance_norm(x, s, b),
    "group_norm": lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=2),
    "local_response_norm": lambda x, s, b: jaxnorm.local_response_norm(x, size=3, alpha=0.5, k=2.0),
    "adaptive_instance_norm": lambda x, s, b: jaxnorm.adaptive_instance_norm(x, x[:, ::-1] * 2),
}


@pytest.mark.parametrize("variant", sorted(SECOND_ORDER))
def test_second_order_gradients_match_finite_differences(variant):
    x, scale, bias = _random(23, (3, 3, 4), (4,), (4,))
    check_grads(
        jax.jit(SECOND_ORDER[variant]),
        (jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias)),
        order=2,
        modes=["rev"],
    )
