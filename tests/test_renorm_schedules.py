"""Batch renormalization with scheduled limits: ``r_max``/``d_max`` of the Linen and NNX
``BatchRenorm`` may be optax schedules of the training step, kept in the statistics
(``batch_stats['step']``); the k-th training call must equal batch renormalization with the
constant limits schedule(k) (the functional ``jaxnorm.batch_norm`` with a ``Renorm``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxnorm
from jaxnorm import linen as jl
from jaxnorm import nnx as jx

R_MAX = optax.linear_schedule(1.0, 3.0, 8)
D_MAX = optax.linear_schedule(0.0, 2.0, 8)
STEPS = 3


def _batches(count: int) -> list[np.ndarray]:
    """Batches far from the initial running statistics (mean 0, var 1), so that r and d
    are clipped and the limits decide the output."""
    rng = np.random.default_rng(0)
    return [rng.normal(4.0, 5.0, size=(16, 3)).astype(np.float32) for _ in range(count)]


def _renorm_output(x, stats, params, r_max, d_max) -> jax.Array:
    renorm = jaxnorm.Renorm(stats["mean"], stats["var"], r_max, d_max)
    return jaxnorm.batch_norm(x, params["scale"], params["bias"], renorm=renorm)[0]


def test_linen_schedule_is_evaluated_at_the_step_and_init_does_not_advance_it():
    batches = _batches(STEPS + 1)
    module = jl.BatchRenorm(use_running_average=False, momentum=0.9, r_max=R_MAX, d_max=D_MAX)
    variables = module.init(jax.random.key(0), batches[0])
    step = variables["batch_stats"]["step"]
    assert step.dtype == jnp.int32 and int(step) == 0
    params = {"scale": jnp.full(3, 1.5), "bias": jnp.full(3, -0.5)}
    variables = {**variables, "params": params}
    train = jax.jit(lambda v, x: module.apply(v, x, mutable=["batch_stats"]))
    for k, x in enumerate(batches):
        stats = variables["batch_stats"]
        assert int(stats["step"]) == k
        y, updates = train(variables, x)
        expected = _renorm_output(x, stats, params, R_MAX(k), D_MAX(k))
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
        other = _renorm_output(x, stats, params, R_MAX(k + 1), D_MAX(k + 1))
        assert not np.allclose(y, other, atol=1e-3)  # the step's limits are what matter
        variables = {**variables, **updates}
    assert int(variables["batch_stats"]["step"]) == STEPS + 1
    _, updates = module.clone(use_running_average=True).apply(
        variables, batches[0], mutable=["batch_stats"]
    )
    assert int(updates["batch_stats"]["step"]) == STEPS + 1  # evaluation leaves the step
    constant = jl.BatchRenorm(use_running_average=False, momentum=0.9, r_max=float(R_MAX(4)),
                              d_max=float(D_MAX(4)))
    stats = {k: v for k, v in variables["batch_stats"].items() if k != "step"}
    y_constant, _ = constant.apply({"params": params, "batch_stats": stats}, batches[0],
                                   mutable=["batch_stats"])
    np.testing.assert_allclose(train(variables, batches[0])[0], y_constant, rtol=1e-6,
                               atol=1e-6)


def test_linen_step_exists_in_every_mode_and_only_with_a_schedule():
    x = _batches(1)[0]
    in_eval = jl.BatchRenorm(r_max=R_MAX).init(jax.random.key(0), x, use_running_average=True)
    assert int(in_eval["batch_stats"]["step"]) == 0
    only_d = jl.BatchRenorm(use_running_average=False, d_max=D_MAX).init(jax.random.key(0), x)
    assert "step" in only_d["batch_stats"]
    constant = jl.BatchRenorm(use_running_average=False).init(jax.random.key(0), x)
    assert set(constant["batch_stats"]) == {"mean", "var"}  # BatchNorm's tree
    with pytest.raises(ValueError, match="r_max must be at least 1"):
        jl.BatchRenorm(use_running_average=False, r_max=0.5).init(jax.random.key(0), x)


def test_nnx_schedule_is_evaluated_at_the_step():
    batches = _batches(STEPS + 1)
    layer = jx.BatchRenorm(3, r_max=R_MAX, d_max=D_MAX, momentum=0.9, rngs=nnx.Rngs(0))
    layer.scale[...], layer.bias[...] = jnp.full(3, 1.5), jnp.full(3, -0.5)
    params = {"scale": layer.scale[...], "bias": layer.bias[...]}
    assert layer.step[...].dtype == jnp.int32 and int(layer.step[...]) == 0

    @nnx.jit
    def forward(layer, x):
        return layer(x)

    for k, x in enumerate(batches):
        stats = {"mean": layer.mean[...], "var": layer.var[...]}
        y = forward(layer, x)
        np.testing.assert_allclose(y, _renorm_output(x, stats, params, R_MAX(k), D_MAX(k)),
                                   rtol=1e-6, atol=1e-6)
    assert int(layer.step[...]) == STEPS + 1
    layer.eval()
    forward(layer, batches[0])
    assert int(layer.step[...]) == STEPS + 1
    jx.recompute_batch_stats(layer, batches)  # precise BN holds the step too
    assert int(layer.step[...]) == STEPS + 1
    assert jx.BatchRenorm(3, rngs=nnx.Rngs(0)).step is None


def test_linen_and_nnx_agree_step_by_step():
    batches = _batches(STEPS)
    module = jl.BatchRenorm(use_running_average=False, r_max=R_MAX, d_max=D_MAX)
    variables = module.init(jax.random.key(0), batches[0])
    layer = jx.BatchRenorm(3, r_max=R_MAX, d_max=D_MAX, rngs=nnx.Rngs(0))
    for x in batches:
        y, updates = module.apply(variables, x, mutable=["batch_stats"])
        variables = {**variables, **updates}
        np.testing.assert_allclose(layer(x), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.var[...], variables["batch_stats"]["var"], rtol=1e-6)
    assert int(layer.step[...]) == int(variables["batch_stats"]["step"]) == STEPS
