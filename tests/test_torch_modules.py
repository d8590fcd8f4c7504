"""PyTorch parity over several training steps: torch.nn.BatchNorm{1,2}d against
jaxnorm.linen.BatchNorm (PyTorch's momentum 0.1 is jaxnorm's 0.9; PyTorch stores the
unbiased running variance)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxnorm import linen as jn

LEARNING_RATE = 0.1


def _batches(count, shape, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal(shape) * (1 + step) + step).astype(np.float32)
        for step in range(count)
    ]


def _jax_train_step(module):
    """One SGD step on ``sum(y * weights)``; returns outputs, input gradient, new state."""

    @jax.jit
    def step(variables, x, weights):
        def loss(params, inputs):
            y, updated = module.apply(
                {**variables, "params": params}, inputs, mutable=["batch_stats"]
            )
            return jnp.sum(y * weights), (y, updated)

        (_, (y, updated)), (grads, x_grad) = jax.value_and_grad(
            loss, argnums=(0, 1), has_aux=True
        )(variables["params"], x)
        params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, variables["params"], grads)
        return y, x_grad, {"params": params, **updated}

    return step


def _torch_train_step(layer, x, weights):
    layer.train()
    inputs = torch.tensor(x, requires_grad=True)
    y = layer(inputs)
    layer.zero_grad()
    (y * torch.tensor(weights)).sum().backward()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter -= LEARNING_RATE * parameter.grad
    return y.detach().numpy(), inputs.grad.numpy()


def _nchw_to_nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def test_batch_norm_2d_parity_over_training_steps():
    channels = 3
    torch_layer = torch.nn.BatchNorm2d(channels, momentum=0.1, eps=1e-5)
    module = jn.BatchNorm(
        use_running_average=False, momentum=0.9, epsilon=1e-5, unbiased_running_var=True
    )
    batches = _batches(4, (6, channels, 5, 4))
    weights = _batches(4, (6, channels, 5, 4), seed=1)
    variables = jax.jit(module.init)(jax.random.key(0), _nchw_to_nhwc(batches[0]))
    step = _jax_train_step(module)

    for x, w in zip(batches, weights, strict=True):
        y_torch, grad_torch = _torch_train_step(torch_layer, x, w)
        y, x_grad, variables = step(variables, _nchw_to_nhwc(x), _nchw_to_nhwc(w))
        np.testing.assert_allclose(y, _nchw_to_nhwc(y_torch), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(x_grad, _nchw_to_nhwc(grad_torch), rtol=1e-4, atol=1e-4)
        stats = variables["batch_stats"]
        np.testing.assert_allclose(stats["mean"], torch_layer.running_mean, rtol=1e-5)
        np.testing.assert_allclose(stats["var"], torch_layer.running_var, rtol=1e-5)
        np.testing.assert_allclose(
            variables["params"]["scale"], torch_layer.weight.detach(), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            variables["params"]["bias"], torch_layer.bias.detach(), rtol=1e-4, atol=1e-5
        )

    test_batch = _batches(1, (2, channels, 5, 4), seed=2)[0]
    torch_layer.eval()
    with torch.no_grad():
        expected = torch_layer(torch.tensor(test_batch)).numpy()
    evaluated = jax.jit(
        jn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5).apply
    )
    np.testing.assert_allclose(
        evaluated(variables, _nchw_to_nhwc(test_batch)), _nchw_to_nhwc(expected),
        rtol=1e-4, atol=1e-4,
    )


def test_batch_norm_1d_momentum_none_matches_cumulative_average():
    features = 4
    torch_layer = torch.nn.BatchNorm1d(features, momentum=None)
    module = jn.BatchNorm(use_running_average=False, momentum=None, unbiased_running_var=True)
    batches = _batches(5, (7, features))
    variables = jax.jit(module.init)(jax.random.key(0), batches[0])
    step = jax.jit(functools.partial(module.apply, mutable=["batch_stats"]))
    torch_layer.train()
    for x in batches:
        with torch.no_grad():
            y_torch = torch_layer(torch.tensor(x)).numpy()
        y, updated = step(variables, x)
        variables = {**variables, **updated}
        np.testing.assert_allclose(y, y_torch, rtol=1e-4, atol=1e-4)
    stats = variables["batch_stats"]
    assert int(stats["count"]) == int(torch_layer.num_batches_tracked) == 5
    np.testing.assert_allclose(stats["mean"], torch_layer.running_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], torch_layer.running_var, rtol=1e-5)

    torch_layer.eval()
    with torch.no_grad():
        expected = torch_layer(torch.tensor(batches[0])).numpy()
    evaluated = jax.jit(jn.BatchNorm(use_running_average=True, momentum=None).apply)
    np.testing.assert_allclose(evaluated(variables, batches[0]), expected, rtol=1e-4, atol=1e-4)


def _torch_affine(layer, seed=3):
    """Random affine parameters for a torch layer; returns them as NumPy."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.tensor(rng.uniform(0.5, 1.5, parameter.shape)))
    return {name: p.detach().numpy() for name, p in layer.named_parameters()}


NCHW_CASES = [
    (
        "GroupNorm",
        lambda: torch.nn.GroupNorm(2, 6, eps=1e-5),
        lambda: jn.GroupNorm(num_groups=2, feature_axis=1, epsilon=1e-5),
    ),
    (
        "InstanceNorm",
        lambda: torch.nn.InstanceNorm2d(6, eps=1e-5, affine=True),
        lambda: jn.InstanceNorm(feature_axes=1, epsilon=1e-5),
    ),
    (
        "LayerNorm",
        lambda: torch.nn.LayerNorm([6, 5, 4], eps=1e-5),
        lambda: jn.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=(1, 2, 3), epsilon=1e-5),
    ),
    (
        "RMSNorm",
        lambda: torch.nn.RMSNorm([5, 4], eps=1e-5),
        lambda: jn.RMSNorm(reduction_axes=(2, 3), feature_axes=(2, 3), epsilon=1e-5),
    ),
    (
        "LocalResponseNorm",
        lambda: torch.nn.LocalResponseNorm(3, alpha=0.1, beta=0.75, k=1.0),
        lambda: jn.LocalResponseNorm(size=3, alpha=0.1, beta=0.75, k=1.0, feature_axis=1),
    ),
]


@pytest.mark.parametrize(("name", "make_torch", "make_ours"), NCHW_CASES,
                         ids=[case[0] for case in NCHW_CASES])
def test_modules_match_torch_on_nchw_input(name, make_torch, make_ours):
    x = _batches(1, (2, 6, 5, 4), seed=4)[0]
    layer = make_torch()
    parameters = _torch_affine(layer)
    params = {"scale": parameters["weight"]} if "weight" in parameters else {}
    if "bias" in parameters:
        params["bias"] = parameters["bias"]
    with torch.no_grad():
        expected = layer(torch.tensor(x)).numpy()
    y = jax.jit(make_ours().apply)({"params": params}, x)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
