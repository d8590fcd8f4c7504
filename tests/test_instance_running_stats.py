"""InstanceNorm with running statistics (PyTorch's ``track_running_stats=True``): the
pooled instance moments of ``jaxnorm.instance_norm(..., return_moments=True)`` against
float64 NumPy, and the Linen and NNX modules against ``torch.nn.InstanceNorm2d`` over
several training steps and then in evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxnorm
from jaxnorm import linen as jl
from jaxnorm import nnx as jx
from tests import reference

CHANNELS = 3
EPS = 1e-5


def _batches(count: int, seed: int = 0) -> list[np.ndarray]:
    """NCHW batches with channel-dependent means and spreads that drift between steps."""
    rng = np.random.default_rng(seed)
    loc = np.array([1.0, -2.0, 0.5])[None, :, None, None]
    return [(rng.normal(size=(4, CHANNELS, 5, 6)) * (1.0 + 0.3 * step) + loc * step)
            .astype(np.float32) for step in range(count)]


def _torch_instance_norm(momentum: float | None, seed: int = 1) -> torch.nn.InstanceNorm2d:
    torch_norm = torch.nn.InstanceNorm2d(CHANNELS, eps=EPS, momentum=momentum, affine=True,
                                         track_running_stats=True)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        torch_norm.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, CHANNELS)))
        torch_norm.bias.copy_(torch.from_numpy(rng.normal(size=CHANNELS)))
    return torch_norm


def _params(torch_norm: torch.nn.InstanceNorm2d) -> dict[str, np.ndarray]:
    return {"scale": torch_norm.weight.detach().numpy().copy(),
            "bias": torch_norm.bias.detach().numpy().copy()}


def _assert_matches_torch(y, stats, torch_y, torch_norm) -> None:
    np.testing.assert_allclose(y, torch_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["mean"], torch_norm.running_mean.numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(stats["var"], torch_norm.running_var.numpy(), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("torch_momentum", [0.1, 0.5])
def test_linen_instance_norm_tracks_running_statistics_as_pytorch(torch_momentum):
    batches = _batches(4)
    torch_norm = _torch_instance_norm(torch_momentum).train()
    module = jl.InstanceNorm(feature_axes=1, epsilon=EPS, track_running_stats=True,
                             momentum=1.0 - torch_momentum)
    variables = module.init(jax.random.key(0), batches[0], use_running_average=False)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(CHANNELS))
    variables = {"params": _params(torch_norm), "batch_stats": variables["batch_stats"]}
    train = jax.jit(lambda v, x: module.apply(v, x, use_running_average=False,
                                              mutable=["batch_stats"]))
    for x in batches:
        torch_y = torch_norm(torch.from_numpy(x)).detach().numpy()
        y, updates = train(variables, x)
        variables = {**variables, **updates}
        _assert_matches_torch(y, variables["batch_stats"], torch_y, torch_norm)
    torch_norm.eval()
    test = _batches(1, seed=5)[0] + 3.0
    y = jax.jit(lambda v, x: module.apply(v, x, use_running_average=True))(variables, test)
    np.testing.assert_allclose(y, torch_norm(torch.from_numpy(test)).detach().numpy(),
                               rtol=1e-4, atol=1e-4)


def test_momentum_none_keeps_the_cumulative_average():
    """(PyTorch's InstanceNorm leaves its statistics at their initial values for
    momentum=None; here it is BatchNorm's exact average over the batches seen.)"""
    batches = _batches(3, seed=4)
    module = jl.InstanceNorm(feature_axes=1, track_running_stats=True, momentum=None)
    variables = module.init(jax.random.key(0), batches[0], use_running_average=False)
    for x in batches:
        _, updates = module.apply(variables, x, use_running_average=False,
                                  mutable=["batch_stats"])
        variables = {**variables, **updates}
    x = np.stack(batches).astype(np.float64)  # (steps, N, C, H, W)
    n = x.shape[3] * x.shape[4]
    stats = variables["batch_stats"]
    assert int(stats["count"]) == len(batches)
    np.testing.assert_allclose(stats["mean"], x.mean(axis=(3, 4)).mean(axis=(0, 1)), rtol=1e-5)
    unbiased = x.var(axis=(3, 4)) * n / (n - 1)
    np.testing.assert_allclose(stats["var"], unbiased.mean(axis=(0, 1)), rtol=1e-5)
    layer = jx.InstanceNorm(CHANNELS, feature_axes=1, track_running_stats=True, momentum=None,
                            rngs=nnx.Rngs(0))
    for x in batches:
        layer(x)
    np.testing.assert_allclose(layer.var[...], stats["var"], rtol=1e-6)
    assert int(layer.count[...]) == len(batches)


def test_nnx_instance_norm_tracks_running_statistics_as_pytorch():
    batches = _batches(3, seed=2)
    torch_norm = _torch_instance_norm(0.1, seed=3).train()
    layer = jx.InstanceNorm(CHANNELS, feature_axes=1, epsilon=EPS, track_running_stats=True,
                            momentum=0.9, rngs=nnx.Rngs(0))
    params = _params(torch_norm)
    layer.scale[...], layer.bias[...] = params["scale"], params["bias"]

    @nnx.jit
    def forward(layer, x):
        return layer(x)

    for x in batches:
        torch_y = torch_norm(torch.from_numpy(x)).detach().numpy()
        y = forward(layer, x)
        stats = {"mean": layer.mean[...], "var": layer.var[...]}
        _assert_matches_torch(y, stats, torch_y, torch_norm)
    torch_norm.eval()
    layer.eval()
    test = _batches(1, seed=6)[0] - 1.0
    np.testing.assert_allclose(forward(layer, test),
                               torch_norm(torch.from_numpy(test)).detach().numpy(),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.mean[...], torch_norm.running_mean.numpy(), rtol=1e-6)
    evaluating = nnx.view(layer, use_running_average=False)
    assert evaluating.use_running_average is False


def test_pooled_moments_against_float64_numpy_with_a_mask():
    """Per channel: mean Σk_nμ_n/Σk_n, var Σk_nσ²_n/Σk_n, count Σk_n, groups = non-empty
    instances; unbiased update Σk_nσ²_n/Σ(k_n - 1)."""
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 3.0, size=(4, 6, 5, 2))
    mask = rng.random(x.shape) < 0.7
    mask[3, :, :, 1] = False  # an empty instance: no count, no group
    with jax.enable_x64(True):
        y, moments = jaxnorm.instance_norm(x, mask=mask, eps=EPS, return_moments=True)
        running = jaxnorm.update_running_statistics(
            jaxnorm.RunningStatistics(jnp.zeros(2), jnp.ones(2)), moments, momentum=0.0,
            unbiased=True,
        )
    counts = mask.sum(axis=(1, 2))  # (N, C)
    sums = np.where(mask, x, 0).sum(axis=(1, 2))
    means = sums / np.maximum(counts, 1)
    squares = np.where(mask, (x - means[:, None, None, :]) ** 2, 0).sum(axis=(1, 2))
    np.testing.assert_allclose(moments.count, counts.sum(0), rtol=1e-12)
    np.testing.assert_allclose(moments.groups, (counts > 0).sum(0), rtol=1e-12)
    np.testing.assert_allclose(moments.mean, sums.sum(0) / counts.sum(0), rtol=1e-10)
    np.testing.assert_allclose(moments.var, squares.sum(0) / counts.sum(0), rtol=1e-10)
    np.testing.assert_allclose(running.var, squares.sum(0) / (counts - (counts > 0)).sum(0),
                               rtol=1e-10)
    expected = reference.instance_norm(x, eps=EPS, mask=mask)
    expected[3, :, :, 1] = 0.0  # a set with nothing counted outputs exactly the bias
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)


def test_training_gradient_is_instance_norms_with_moments_returned():
    with jax.enable_x64(True):
        x, dy = np.random.default_rng(8).normal(size=(2, 3, 4, 5, 6)).reshape(2, 3, 20, 6)
        scale = np.random.default_rng(9).uniform(0.5, 2.0, 6)

        def loss(x, scale):
            y, moments = jaxnorm.instance_norm(x, scale, eps=EPS, return_moments=True)
            return jnp.sum(y * dy) + 0.0 * jnp.sum(moments.mean)

        dx, dscale = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, scale)
        expected = reference.instance_norm_vjp(dy, x, scale, eps=EPS)
    np.testing.assert_allclose(dx, expected[0], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(dscale, expected[1], rtol=1e-9, atol=1e-10)


def test_without_tracking_the_variables_stay_flaxs_and_evaluation_uses_instances():
    x = _batches(1)[0]
    plain = jl.InstanceNorm(feature_axes=1)
    variables = plain.init(jax.random.key(0), x)
    assert set(variables) == {"params"}
    np.testing.assert_allclose(plain.apply(variables, x, use_running_average=True),
                               plain.apply(variables, x), atol=0)
    assert jx.InstanceNorm(CHANNELS, rngs=nnx.Rngs(0)).mean is None


def test_init_does_not_move_the_running_statistics_and_eval_uses_them():
    x = _batches(1)[0].transpose(0, 2, 3, 1)  # NHWC
    module = jl.InstanceNorm(track_running_stats=True)
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(CHANNELS))
    stats = {"mean": np.array([1.0, -1.0, 2.0], np.float32),
             "var": np.array([4.0, 0.25, 1.0], np.float32)}
    y = module.apply({**variables, "batch_stats": stats}, x, use_running_average=True)
    expected = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-6)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="momentum must lie in"):
        jl.InstanceNorm(track_running_stats=True, momentum=1.5).init(
            jax.random.key(0), x, use_running_average=False)


def test_a_pytorch_checkpoint_loads_into_the_tracking_module():
    torch_norm = _torch_instance_norm(0.1, seed=10).train()
    for x in _batches(2, seed=11):
        torch_norm(torch.from_numpy(x))
    torch_norm.eval()
    (variables,) = jaxnorm.flax_variables_from_torch(torch_norm.state_dict()).values()
    module = jl.InstanceNorm(feature_axes=1, epsilon=EPS, track_running_stats=True)
    x = _batches(1, seed=12)[0]
    np.testing.assert_allclose(module.apply(variables, x, use_running_average=True),
                               torch_norm(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-4, atol=1e-4)
