"""jaxnorm.nnx: drop-in for flax.nnx (state both ways), train/eval, and parity with Linen."""

from __future__ import annotations

import functools

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnorm import linen as jl
from jaxnorm import nnx as jn


def _data(shape, seed=1, loc=2.0, spread=3.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * spread + loc).astype(np.float32)


def _randomize(module, seed=7):
    """Fills every float variable of ``module`` with values in [0.5, 1.5)."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)

    nnx.update(module, jax.tree.map(fill, nnx.state(module)))
    return module


def _kinds(module):
    """Variable type, shape and dtype of every entry of ``module``'s state."""
    return jax.tree.map(
        lambda v: (type(v).__name__, v.shape, jnp.dtype(v.dtype).name),
        nnx.state(module),
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )


@nnx.jit
def _call(module, x):
    return module(x)


DROP_IN_CASES = [
    ("BatchNorm", (4,), {}, (6, 3, 3, 4)),
    ("BatchNorm", (4,), {"use_bias": False, "momentum": 0.5}, (8, 4)),
    ("LayerNorm", (5,), {}, (4, 3, 5)),
    ("RMSNorm", (5,), {"use_scale": True}, (4, 3, 5)),
    ("GroupNorm", (6, 2), {}, (3, 4, 4, 6)),
    ("GroupNorm", (6, None, 3), {"reduction_axes": (1, 2, 3)}, (3, 4, 4, 6)),
    ("InstanceNorm", (6,), {}, (3, 4, 4, 6)),
]
CASE_IDS = [f"{name}-{i}" for i, (name, *_) in enumerate(DROP_IN_CASES)]


@pytest.mark.parametrize(("name", "args", "kwargs", "shape"), DROP_IN_CASES, ids=CASE_IDS)
def test_state_matches_flax_nnx_and_loads_both_ways(name, args, kwargs, shape):
    x = _data(shape)
    ours = getattr(jn, name)(*args, **kwargs, rngs=nnx.Rngs(0))
    theirs = getattr(nnx, name)(*args, **kwargs, rngs=nnx.Rngs(0))
    assert _kinds(ours) == _kinds(theirs)
    np.testing.assert_allclose(_call(ours, x), _call(theirs, x), rtol=2e-5, atol=2e-5)

    _randomize(theirs)
    nnx.update(ours, nnx.state(theirs))
    np.testing.assert_allclose(_call(ours, x), _call(theirs, x), rtol=2e-5, atol=2e-5)
    jax.tree.map(  # training-mode BatchNorm moved both running averages alike
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        nnx.state(ours), nnx.state(theirs),
    )
    _randomize(ours, seed=8)
    nnx.update(theirs, nnx.state(ours))
    ours.eval()
    theirs.eval()
    np.testing.assert_allclose(_call(ours, x), _call(theirs, x), rtol=2e-5, atol=2e-5)


def test_train_and_eval_toggle_running_statistics():
    x = _data((8, 3), loc=4.0)
    module = jn.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    train_output = _call(module, x)
    np.testing.assert_allclose(module.mean[...], 0.5 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(train_output.mean(0), np.zeros(3), atol=1e-5)

    module.eval()
    frozen = np.asarray(module.mean[...])
    eval_output = _call(module, x)
    np.testing.assert_array_equal(module.mean[...], frozen)
    expected = (x - frozen) / np.sqrt(np.asarray(module.var[...]) + 1e-5)
    np.testing.assert_allclose(eval_output, expected, rtol=1e-5, atol=1e-5)

    training_view = nnx.view(module, use_running_average=False)
    assert module.use_running_average and not training_view.use_running_average
    module.train()
    _call(module, x)
    np.testing.assert_allclose(module.mean[...], 0.75 * x.mean(0), rtol=1e-5)


def test_momentum_none_keeps_a_batch_count():
    batches = [_data((8, 3), seed=s, loc=s) for s in range(3)]
    module = jn.BatchNorm(3, momentum=None, unbiased_running_var=True, rngs=nnx.Rngs(0))
    for x in batches:
        _call(module, x)
    assert int(module.count[...]) == 3
    np.testing.assert_allclose(module.mean[...], np.mean([b.mean(0) for b in batches], 0),
                               rtol=1e-5)
    np.testing.assert_allclose(
        module.var[...], np.mean([b.var(0, ddof=1) for b in batches], 0), rtol=1e-5
    )


def test_missing_use_running_average_is_an_error():
    module = jn.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="use_running_average"):
        module(_data((4, 3)))


LINEN_PAIRS = [
    ("BatchNorm", {"momentum": 0.8, "unbiased_running_var": True, "virtual_batch_size": 2}),
    ("BatchRenorm", {"momentum": 0.8, "r_max": 1.2, "d_max": 0.1}),
]


@pytest.mark.parametrize(("name", "kwargs"), LINEN_PAIRS, ids=[n for n, _ in LINEN_PAIRS])
def test_nnx_and_linen_share_the_training_math(name, kwargs):
    x = _data((6, 2, 3))
    module = _randomize(getattr(jn, name)(3, **kwargs, rngs=nnx.Rngs(0)))
    state = nnx.state(module)
    variables = {
        "params": {"scale": state["scale"][...], "bias": state["bias"][...]},
        "batch_stats": {"mean": state["mean"][...], "var": state["var"][...]},
    }
    linen = getattr(jl, name)(use_running_average=False, **kwargs)
    y_linen, updated = jax.jit(functools.partial(linen.apply, mutable=["batch_stats"]))(
        variables, x
    )
    np.testing.assert_allclose(_call(module, x), y_linen, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(module.mean[...], updated["batch_stats"]["mean"], rtol=1e-6)
    np.testing.assert_allclose(module.var[...], updated["batch_stats"]["var"], rtol=1e-6)


def test_batch_renorm_with_unit_limits_is_batch_norm():
    x = _data((8, 3))
    renorm = _randomize(jn.BatchRenorm(3, r_max=1.0, d_max=0.0, rngs=nnx.Rngs(0)))
    plain = _randomize(jn.BatchNorm(3, rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(_call(renorm, x), _call(plain, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(renorm.var[...], plain.var[...], rtol=1e-6)


def test_parameter_modules_have_flax_style_parameters():
    x = _data((2, 4, 4, 3))
    cin = jn.ConditionalInstanceNorm(3, num_styles=5, rngs=nnx.Rngs(0))
    assert cin.scale[...].shape == cin.bias[...].shape == (5, 3)
    assert isinstance(cin.scale, nnx.Param)
    np.testing.assert_allclose(  # unit scale and zero bias: instance norm for every style
        jax.jit(lambda a: nnx.merge(*nnx.split(cin))(a, jnp.array([4, 1])))(x),
        (x - x.mean((1, 2), keepdims=True)) / np.sqrt(x.var((1, 2), keepdims=True) + 1e-6),
        rtol=1e-4, atol=1e-4,
    )
    assert nnx.state(jn.LocalResponseNorm()) == nnx.State({})
    assert nnx.state(jn.AdaptiveInstanceNorm()) == nnx.State({})


def test_group_norm_reduction_axes_without_axis_one_match_flax_linen():
    """flax.nnx.GroupNorm repeats its group statistics along axis 1 whatever the reduction
    axes, so here the reference is flax.linen.GroupNorm (same math, correct)."""
    x = _data((3, 4, 4, 6))
    ours = _randomize(jn.GroupNorm(6, None, 3, reduction_axes=(2, 3), rngs=nnx.Rngs(0)))
    params = {"scale": ours.scale[...], "bias": ours.bias[...]}
    reference = fnn.GroupNorm(num_groups=None, group_size=3, reduction_axes=(2, 3))
    np.testing.assert_allclose(
        _call(ours, x), jax.jit(reference.apply)({"params": params}, x), rtol=2e-5, atol=2e-5
    )


def test_use_fast_variance_selects_flax_one_pass_formula():
    x = _data((64, 16), loc=1e4, spread=1.0)
    ours = jn.BatchNorm(16, use_fast_variance=True, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(16, use_fast_variance=True, rngs=nnx.Rngs(0))
    fast = ours(x)
    np.testing.assert_allclose(fast, theirs(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.var[...], theirs.var[...], rtol=1e-6)
    assert float(np.std(fast)) > 10
    stable = jn.BatchNorm(16, rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(float(np.std(stable)), 1.0, atol=1e-3)
