"""Forward parity with ``torch.nn.functional`` (CPU, float32)."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import pytest

import jaxnorm

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOLERANCE = {"rtol": 1e-5, "atol": 2e-5}


def _inputs(seed: int, x_shape: tuple[int, ...], channels: int):
    rng = np.random.default_rng(seed)
    x = (1.5 * rng.normal(size=x_shape) + 0.5).astype(np.float32)
    scale = rng.normal(size=channels).astype(np.float32)
    bias = rng.normal(size=channels).astype(np.float32)
    return x, scale, bias


def _compiled(fn, *arrays, **static):
    """``fn(*arrays, **static)`` as one compiled program (one compile, not one per op)."""
    return jax.tree.map(np.asarray, jax.jit(partial(fn, **static))(*arrays))


def _torch(*arrays: np.ndarray):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, 1, -1)


@pytest.mark.parametrize(
    "shape", [(8, 5), (4, 3, 6), (3, 4, 5, 6)], ids=["dense", "sequence", "image"]
)
def test_batch_norm_training_matches_torch(shape):
    x, scale, bias = _inputs(0, shape, shape[1])
    tx, tscale, tbias = _torch(x, scale, bias)
    running_mean, running_var = torch.zeros(shape[1]), torch.ones(shape[1])
    expected = F.batch_norm(
        tx, running_mean, running_var, tscale, tbias, training=True, momentum=1.0, eps=1e-3
    )
    y, mean, var = _compiled(jaxnorm.batch_norm, x, scale, bias, axis=1, eps=1e-3)
    np.testing.assert_allclose(np.asarray(y), expected.numpy(), **TOLERANCE)
    # with momentum=1 torch's running stats are the batch mean and the *unbiased* variance
    count = x.size // shape[1]
    np.testing.assert_allclose(np.asarray(mean), running_mean.numpy(), **TOLERANCE)
    np.testing.assert_allclose(
        np.asarray(var) * count / (count - 1), running_var.numpy(), **TOLERANCE
    )


def test_batch_norm_training_channels_last_matches_torch_channels_first():
    x, scale, bias = _inputs(1, (3, 4, 5, 6), 4)
    expected = F.batch_norm(*_torch(x), None, None, *_torch(scale, bias), training=True)
    y, _, _ = _compiled(jaxnorm.batch_norm, _nhwc(x), scale, bias)
    np.testing.assert_allclose(np.asarray(y), _nhwc(expected.numpy()), **TOLERANCE)


@pytest.mark.parametrize("axis", [1, -1], ids=["nchw", "nhwc"])
def test_batch_norm_inference_matches_torch_eval(axis):
    x, scale, bias = _inputs(2, (3, 4, 5, 6), 4)
    rng = np.random.default_rng(3)
    mean = rng.normal(size=4).astype(np.float32)
    var = rng.uniform(0.2, 2.0, size=4).astype(np.float32)
    expected = F.batch_norm(*_torch(x, mean, var, scale, bias), training=False, eps=1e-4)
    x_in = x if axis == 1 else _nhwc(x)
    y = _compiled(jaxnorm.batch_norm_inference, x_in, mean, var, scale, bias, axis=axis, eps=1e-4)
    y = np.asarray(y) if axis == 1 else np.moveaxis(np.asarray(y), -1, 1)
    np.testing.assert_allclose(y, expected.numpy(), **TOLERANCE)


@pytest.mark.parametrize("normalized_shape", [(6,), (5, 6), (4, 5, 6)])
def test_layer_norm_matches_torch(normalized_shape):
    x, _, _ = _inputs(4, (3, 4, 5, 6), 1)
    rng = np.random.default_rng(5)
    scale = rng.normal(size=normalized_shape).astype(np.float32)
    bias = rng.normal(size=normalized_shape).astype(np.float32)
    expected = F.layer_norm(*_torch(x), normalized_shape, *_torch(scale, bias), eps=1e-5)
    axes = tuple(range(-len(normalized_shape), 0))
    y = _compiled(
        jaxnorm.layer_norm, x, scale, bias, reduction_axes=axes, feature_axes=axes, eps=1e-5
    )
    np.testing.assert_allclose(np.asarray(y), expected.numpy(), **TOLERANCE)


@pytest.mark.parametrize("normalized_shape", [(6,), (5, 6)])
def test_rms_norm_matches_torch(normalized_shape):
    x, _, _ = _inputs(6, (3, 4, 5, 6), 1)
    scale = np.random.default_rng(7).normal(size=normalized_shape).astype(np.float32)
    expected = F.rms_norm(*_torch(x), normalized_shape, *_torch(scale), eps=1e-6)
    axes = tuple(range(-len(normalized_shape), 0))
    y = _compiled(jaxnorm.rms_norm, x, scale, reduction_axes=axes, feature_axes=axes, eps=1e-6)
    np.testing.assert_allclose(np.asarray(y), expected.numpy(), **TOLERANCE)


@pytest.mark.parametrize("num_groups", [1, 2, 3, 6])
def test_group_norm_channels_first_matches_torch(num_groups):
    x, scale, bias = _inputs(8, (3, 6, 4, 5), 6)
    expected = F.group_norm(*_torch(x), num_groups, *_torch(scale, bias), eps=1e-5)
    y = _compiled(
        jaxnorm.group_norm, x, scale, bias, num_groups=num_groups, feature_axis=1, eps=1e-5
    )
    np.testing.assert_allclose(np.asarray(y), expected.numpy(), **TOLERANCE)


@pytest.mark.parametrize("num_groups", [2, 4])
def test_group_norm_channels_last_matches_torch_through_transposes(num_groups):
    x, scale, bias = _inputs(9, (2, 8, 3, 5), 8)
    expected = F.group_norm(*_torch(x), num_groups, *_torch(scale, bias), eps=1e-6)
    y = _compiled(jaxnorm.group_norm, _nhwc(x), scale, bias, num_groups=num_groups)
    np.testing.assert_allclose(np.asarray(y), _nhwc(expected.numpy()), **TOLERANCE)


@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 3, 4, 5)], ids=["1d", "2d"])
def test_instance_norm_matches_torch(shape):
    x, scale, bias = _inputs(10, shape, 3)
    expected = F.instance_norm(
        *_torch(x), weight=torch.from_numpy(scale), bias=torch.from_numpy(bias), eps=1e-5
    )
    y = _compiled(jaxnorm.instance_norm, x, scale, bias, feature_axes=1, eps=1e-5)
    np.testing.assert_allclose(np.asarray(y), expected.numpy(), **TOLERANCE)
    y_nhwc = _compiled(jaxnorm.instance_norm, np.moveaxis(x, 1, -1), scale, bias, eps=1e-5)
    np.testing.assert_allclose(
        np.asarray(y_nhwc), np.moveaxis(expected.numpy(), 1, -1), **TOLERANCE
    )


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 6])
def test_local_response_norm_matches_torch(size):
    x, _, _ = _inputs(11, (2, 9, 4, 3), 1)
    x = 4.0 * x  # large enough that the normalizer is far from k
    expected = F.local_response_norm(*_torch(x), size, alpha=0.3, beta=0.75, k=2.0)
    y = _compiled(
        jaxnorm.local_response_norm, x, size=size, alpha=0.3, beta=0.75, k=2.0, feature_axis=1
    )
    np.testing.assert_allclose(np.asarray(y), expected.numpy(), **TOLERANCE)
    y_nhwc = _compiled(
        jaxnorm.local_response_norm, _nhwc(x), size=size, alpha=0.3, beta=0.75, k=2.0
    )
    np.testing.assert_allclose(np.asarray(y_nhwc), _nhwc(expected.numpy()), **TOLERANCE)


def test_local_response_norm_defaults_match_torch_defaults():
    x, _, _ = _inputs(12, (2, 7, 5), 1)
    expected = torch.nn.LocalResponseNorm(5)(*_torch(10.0 * x))
    y = _compiled(jaxnorm.local_response_norm, 10.0 * x, feature_axis=1)
    np.testing.assert_allclose(np.asarray(y), expected.numpy(), **TOLERANCE)
