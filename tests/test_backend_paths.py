"""The statistics paths that ``lax.platform_dependent`` selects on GPU and TPU, run on CPU.

The test suite runs on CPU, where the dispatcher takes ``_cpu_moments``; GPU's fused row
reductions (``_refined_rows``), TPU's tile pivot (``_tile_shifted``) and the shifted single
pass both use for strided sets and inside derivatives would otherwise go untested. Each must keep the numerics guarantees:
two-pass accuracy at |mean|/std = 1e4 and exact statistics for constant sets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxnorm import _stats

ROWS = (64, 1000)


def _refined_rows(x, axes):
    return _stats._refined_rows(jnp.asarray(x, jnp.float32), axes)


def _tile_shifted(x, axes):
    raw = jnp.asarray(x)
    return _stats._tile_shifted(raw.astype(jnp.float32), raw, axes)


def _shifted_single_pass(x, axes):
    raw = jnp.asarray(x)
    return _stats._first_element_shifted(raw.astype(jnp.float32), raw, axes)


def _cpu_moments(x, axes):
    return _stats._cpu_moments(jnp.asarray(x, jnp.float32), axes)


PATHS = [
    pytest.param(_refined_rows, id="gpu-refined-rows"),
    pytest.param(_tile_shifted, id="tpu-tile-pivot"),
    pytest.param(_shifted_single_pass, id="gpu-tpu-shifted-single-pass"),
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


@pytest.mark.parametrize("path", [_shifted_single_pass, _cpu_moments, _tile_shifted,
                                  _refined_rows], ids=["shifted", "cpu", "tpu", "gpu"])
def test_empty_sets_give_zero_statistics_of_the_right_shape(path):
    moments = path(np.zeros((5, 0), np.float32), (1,))
    assert moments.mean.shape == moments.var.shape == (5, 1)
    np.testing.assert_array_equal(np.asarray(moments.var), 0)
    np.testing.assert_array_equal(np.asarray(moments.count), 0)
