"""recompute_batch_stats: exact population statistics of every BatchNorm layer's input over
all batches, with later layers seeing the training-mode outputs of earlier ones."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict, freeze

import jaxnorm
from jaxnorm import linen as jl
from jaxnorm import nnx as jx

EPS = 1e-5


class TwoBatchNorms(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = jl.BatchNorm(use_running_average=not train, name="first")(x)
        x = nn.Dense(3, name="dense")(x)
        return jl.BatchNorm(
            use_running_average=not train, momentum=None, unbiased_running_var=True,
            name="second",
        )(x)


def _batches():
    rng = np.random.default_rng(0)
    return [
        (rng.standard_normal((8, 4)) * (1 + i) + 3 * i).astype(np.float32) for i in range(3)
    ]


def _variables(model, x):
    variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), x, train=False)
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32), variables["params"]
    )
    return {"params": params, "batch_stats": variables["batch_stats"]}


def _expected(variables, batches):
    """Float64 NumPy: each batch through the first layer in training mode, then pooled."""
    params = variables["params"]
    hidden = []
    for x in batches:
        x = x.astype(np.float64)
        normalized = (x - x.mean(0)) / np.sqrt(x.var(0) + EPS)
        normalized = normalized * params["first"]["scale"] + params["first"]["bias"]
        hidden.append(normalized @ params["dense"]["kernel"] + params["dense"]["bias"])
    inputs, hidden = np.concatenate(batches).astype(np.float64), np.concatenate(hidden)
    return {
        "first": {"mean": inputs.mean(0), "var": inputs.var(0)},
        "second": {"mean": hidden.mean(0), "var": hidden.var(0, ddof=1), "count": 3},
    }


def test_recomputed_statistics_are_the_population_statistics_of_every_layer():
    model, batches = TwoBatchNorms(), _batches()
    variables = _variables(model, batches[0])
    result = jaxnorm.recompute_batch_stats(
        functools.partial(model.apply, train=True), variables, batches
    )
    expected = _expected(variables, batches)
    for layer in ("first", "second"):
        for name in ("mean", "var"):
            np.testing.assert_allclose(
                result["batch_stats"][layer][name], expected[layer][name], rtol=1e-5,
                atol=1e-5, err_msg=f"{layer}/{name}",
            )
    assert int(result["batch_stats"]["second"]["count"]) == 3
    jax.tree.map(np.testing.assert_array_equal, result["params"], variables["params"])
    np.testing.assert_array_equal(variables["batch_stats"]["first"]["mean"], np.zeros(4))


def test_frozen_variables_come_back_frozen():
    model, batches = TwoBatchNorms(), _batches()
    variables = freeze(_variables(model, batches[0]))
    result = jaxnorm.recompute_batch_stats(
        functools.partial(model.apply, train=True), variables, batches[:1]
    )
    assert isinstance(result, FrozenDict)
    np.testing.assert_allclose(
        result["batch_stats"]["first"]["mean"], batches[0].mean(0), rtol=1e-5, atol=1e-6
    )


def test_evaluation_mode_apply_fn_is_an_error():
    model, batches = TwoBatchNorms(), _batches()
    variables = _variables(model, batches[0])
    with pytest.raises(ValueError, match="training mode"):
        jaxnorm.recompute_batch_stats(
            functools.partial(model.apply, train=False), variables, batches
        )


class NnxTwoBatchNorms(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.first = jx.BatchNorm(4, rngs=rngs)
        self.dense = nnx.Linear(4, 3, rngs=rngs)
        self.second = jx.BatchNorm(3, momentum=None, unbiased_running_var=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.second(self.dense(self.first(x)))


def test_nnx_recompute_matches_linen_in_place_and_restores_the_mode():
    model, batches = TwoBatchNorms(), _batches()
    variables = _variables(model, batches[0])
    expected = _expected(variables, batches)
    nnx_model = NnxTwoBatchNorms(nnx.Rngs(0))
    for layer, names in (("first", ("scale", "bias")), ("dense", ("kernel", "bias")),
                         ("second", ("scale", "bias"))):
        for name in names:
            getattr(getattr(nnx_model, layer), name)[...] = variables["params"][layer][name]
    nnx_model.eval()
    jx.recompute_batch_stats(nnx_model, batches)
    for layer in ("first", "second"):
        for name in ("mean", "var"):
            np.testing.assert_allclose(
                getattr(getattr(nnx_model, layer), name)[...], expected[layer][name],
                rtol=1e-5, atol=1e-5, err_msg=f"{layer}/{name}",
            )
    assert int(nnx_model.second.count[...]) == 3
    assert nnx_model.first.use_running_average and nnx_model.second.use_running_average
    assert not nnx.state(nnx_model, nnx.Intermediate)


class SharedBatchNorm(nn.Module):
    """One BatchNorm applied twice per forward pass (shared weights)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = jl.BatchNorm(use_running_average=not train, name="shared")
        return norm(x) + norm(x * 3 + 7)


def _both_calls(batches):
    return np.concatenate([np.concatenate([x, x * 3 + 7]) for x in batches]).astype(np.float64)


def test_a_layer_called_twice_pools_both_calls():
    model, batches = SharedBatchNorm(), _batches()
    variables = model.init(jax.random.key(0), batches[0], train=False)
    result = jaxnorm.recompute_batch_stats(
        functools.partial(model.apply, train=True), variables, batches
    )
    inputs = _both_calls(batches)
    stats = result["batch_stats"]["shared"]
    np.testing.assert_allclose(stats["mean"], inputs.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["var"], inputs.var(0), rtol=1e-5, atol=1e-5)


class NnxSharedBatchNorm(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.shared = jx.BatchNorm(4, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.shared(x) + self.shared(x * 3 + 7)


def test_nnx_a_layer_called_twice_pools_both_calls():
    batches = _batches()
    model = jx.recompute_batch_stats(NnxSharedBatchNorm(nnx.Rngs(0)), batches)
    inputs = _both_calls(batches)
    np.testing.assert_allclose(model.shared.mean[...], inputs.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.shared.var[...], inputs.var(0), rtol=1e-5, atol=1e-5)


def test_moments_left_in_the_variables_by_an_earlier_apply_are_ignored():
    model, batches = TwoBatchNorms(), _batches()
    variables = _variables(model, batches[0])
    _, mutated = model.apply(
        variables, batches[1] * 5 + 3, train=True, mutable=["batch_stats", "batch_moments"]
    )
    stale = {**variables, "batch_moments": mutated["batch_moments"]}
    result = jaxnorm.recompute_batch_stats(
        functools.partial(model.apply, train=True), stale, batches
    )
    expected = _expected(variables, batches)
    np.testing.assert_allclose(
        result["batch_stats"]["first"]["mean"], expected["first"]["mean"], rtol=1e-5, atol=1e-5
    )
