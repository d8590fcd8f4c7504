"""Forward mode, both modes to second order, and gradients of replicated parameters under
shard_map: the fused closed-form derivative must serve every JAX transformation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jaxnorm

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(4, 3, 2, 6)) * 2 + 1, jnp.float32)
SCALE = jnp.asarray(RNG.uniform(0.5, 1.5, size=6), jnp.float32)
BIAS = jnp.asarray(RNG.normal(size=6), jnp.float32)
WEIGHTS = jnp.asarray(RNG.normal(size=X.shape), jnp.float32)

VARIANTS = {
    "batch_norm": lambda x, s, b: jaxnorm.batch_norm(x, s, b)[0],
    "layer_norm": lambda x, s, b: jaxnorm.layer_norm(x, s, b),
    "rms_norm": lambda x, s, b: jaxnorm.rms_norm(x, s) + b,
    "instance_norm": lambda x, s, b: jaxnorm.instance_norm(x, s, b),
    "group_norm": lambda x, s, b: jaxnorm.group_norm(x, s, b, num_groups=3),
    "masked_batch_norm": lambda x, s, b: jaxnorm.batch_norm(
        x, s, b, mask=jnp.arange(4)[:, None, None, None] < 3
    )[0],
}


@pytest.fixture
def float64():
    """float64 inside one test only."""
    with jax.enable_x64(True):
        yield


def loss(variant, x, scale, bias):
    return jnp.sum(WEIGHTS * VARIANTS[variant](x, scale, bias) ** 2)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_mode_matches_reverse_mode(variant):
    tangents = tuple(jnp.asarray(RNG.normal(size=a.shape), jnp.float32) for a in (X, SCALE, BIAS))
    _, forward = jax.jvp(lambda *a: loss(variant, *a), (X, SCALE, BIAS), tangents)
    reverse = jax.grad(lambda *a: loss(variant, *a), argnums=(0, 1, 2))(X, SCALE, BIAS)
    expected = sum(jnp.vdot(g, t) for g, t in zip(reverse, tangents))
    np.testing.assert_allclose(forward, expected, rtol=2e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["batch_norm", "layer_norm", "group_norm", "rms_norm"])
def test_second_order_in_both_modes_matches_finite_differences(variant, float64):
    x = np.asarray(X[:2, :2], np.float64)
    scale, bias = np.asarray(SCALE, np.float64), np.asarray(BIAS, np.float64)
    weights = np.asarray(WEIGHTS[:2, :2], np.float64)

    def f(x, scale, bias):
        return jnp.sum(weights * VARIANTS[variant](x, scale, bias) ** 2)

    check_grads(f, (x, scale, bias), order=2, modes=("fwd", "rev"), eps=1e-4)


def test_hessian_of_layer_norm_is_symmetric_and_matches_jacfwd_of_jacrev(float64):
    x = np.asarray(RNG.normal(size=(5,)), np.float64)
    weights = np.asarray(WEIGHTS[0, 0, 0, :5], np.float64)

    def f(v):
        return jnp.sum(weights * jaxnorm.layer_norm(v) ** 3)

    hessian = jax.hessian(f)(x)
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-12)
    np.testing.assert_allclose(hessian, jax.jacrev(jax.jacrev(f))(x), atol=1e-12)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices; see conftest.py")
@pytest.mark.parametrize("variant", ["batch_norm", "layer_norm", "group_norm"])
def test_replicated_parameter_gradients_under_shard_map_sum_the_devices(variant):
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))

    def per_device(scale, bias, x, weights):
        def local_loss(scale, bias):
            return jnp.sum(weights * VARIANTS[variant](x, scale, bias) ** 2)

        return jax.grad(local_loss, argnums=(0, 1))(scale, bias)

    sharded = jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P(), P()),
        )
    )
    got = sharded(SCALE, BIAS, X, WEIGHTS)
    expected = [jnp.zeros_like(SCALE), jnp.zeros_like(BIAS)]
    for i in range(4):
        part = slice(i, i + 1)
        grads = jax.grad(
            lambda s, b, part=part: jnp.sum(WEIGHTS[part] * VARIANTS[variant](X[part], s, b) ** 2),
            argnums=(0, 1),
        )(SCALE, BIAS)
        expected = [e + g for e, g in zip(expected, grads)]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
