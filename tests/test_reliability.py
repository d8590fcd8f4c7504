"""Issue 10: reliability and drop-in behaviour, one test (or parametrized test) per item.

Flax (``flax.linen`` / ``flax.nnx``) is the reference wherever it defines the behaviour;
where it does not (a fully masked set, out-of-range style ids, argument checks) the rule
stated in the issue is. Each item's test failed on the code the issue was written against
(commit 9a92e67) and passes after the fix (a6e72d6); the few companion cases that passed
there already (``use_fast_variance=False`` with NaN, momentum 0 and 1, ...) guard the
behaviour next to each item.
"""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
from jaxnorm import linen as jl
from jaxnorm import nnx as jx

KEY = jax.random.key(0)
APIS = ("linen", "nnx")
HALF_AND_FULL = (jnp.float32, jnp.float16, jnp.bfloat16)


def _data(shape, seed=0, loc=0.0, spread=1.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * spread + loc).astype(dtype)


def _nnx_module(lib, name, features, **kwargs):
    """``lib.<name>`` built the NNX way; ``features`` are the positional arguments."""
    return getattr(lib, name)(*features, rngs=nnx.Rngs(0), **kwargs)


def _linen_output(module, *args, **kwargs):
    """``module.init_with_output``: the output and the variables (eager: for these small
    inputs cheaper than compiling each case under ``jit``)."""
    return module.init_with_output(KEY, *args, **kwargs)


def _linen_apply(module, variables, *args, **kwargs):
    """``module.apply`` with ``batch_stats`` mutable: ``(y, updates)``."""
    return module.apply(variables, *args, mutable=["batch_stats"], **kwargs)


def _nnx_output(module, *args, **kwargs):
    """``module(*args, **kwargs)`` (eager)."""
    return module(*args, **kwargs)


def _linen_train(module, variables, x, **kwargs):
    """One training call of a Linen BatchNorm: ``(y, batch_stats)``."""
    y, updates = module.apply(variables, x, mutable=["batch_stats"], **kwargs)
    return y, updates["batch_stats"]


def _nnx_stats(module):
    """The running statistics of an NNX BatchNorm as a plain dict of arrays."""
    stats = {"mean": module.mean[...], "var": module.var[...]}
    if getattr(module, "count", None) is not None:
        stats["count"] = module.count[...]
    return stats


def _assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def _known_running_statistics(channels, momentum, seed=3):
    """Running statistics far from their initial values, so that any move shows."""
    rng = np.random.default_rng(seed)
    stats = {
        "mean": jnp.asarray(rng.uniform(-2, 2, channels), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 3, channels), jnp.float32),
    }
    if momentum is None:
        stats["count"] = jnp.asarray(5, jnp.int32)
    return stats


# --------------------------------------------------------------------------------------
# Silent loss of state
# --------------------------------------------------------------------------------------

# A fully masked batch must leave the running statistics (mean, var, count) unchanged.


@pytest.mark.parametrize("momentum", [0.9, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("api", APIS)
def test_fully_masked_batch_leaves_running_statistics_unchanged(api, momentum):
    x = _data((8, 3), loc=2.0)
    mask = np.zeros(x.shape, bool)
    start = _known_running_statistics(3, momentum)
    if api == "linen":
        module = jl.BatchNorm(use_running_average=False, momentum=momentum)
        variables = {"params": module.init(KEY, x)["params"], "batch_stats": start}
        stats = start
        for _ in range(2):
            _, stats = _linen_train(module, {**variables, "batch_stats": stats}, x, mask=mask)
    else:
        module = _nnx_module(jx, "BatchNorm", (3,), momentum=momentum)
        module.mean[...], module.var[...] = start["mean"], start["var"]
        if momentum is None:
            module.count[...] = start["count"]
        for _ in range(2):
            module(x, mask=mask)
        stats = _nnx_stats(module)
    _assert_trees_equal(stats, start)


@pytest.mark.parametrize("api", APIS)
def test_channel_with_nothing_counted_keeps_its_running_statistics(api):
    """Channel 0 is masked in every row; channels 1, 2 must still follow Flax's update."""
    x = _data((8, 3), loc=1.0, spread=2.0)
    mask = np.random.default_rng(5).random(x.shape) < 0.7
    mask[:2, 1:] = True
    mask[:, 0] = False
    start = _known_running_statistics(3, 0.9)
    if api == "linen":
        ours, theirs = (lib.BatchNorm(use_running_average=False, momentum=0.9) for lib in (jl, fnn))
        variables = {"params": theirs.init(KEY, x)["params"], "batch_stats": start}
        _, stats = _linen_train(ours, variables, x, mask=mask)
        _, expected = _linen_train(theirs, variables, x, mask=mask)
    else:
        ours, theirs = (_nnx_module(lib, "BatchNorm", (3,), momentum=0.9) for lib in (jx, nnx))
        for module in (ours, theirs):
            module.mean[...], module.var[...] = start["mean"], start["var"]
            module(x, mask=mask)
        stats, expected = _nnx_stats(ours), _nnx_stats(theirs)
    for name in ("mean", "var"):
        np.testing.assert_allclose(stats[name][1:], expected[name][1:], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(stats[name][0], start[name][0])


def _members(x, mask, members=4):
    return x.reshape(members, -1, *x.shape[1:]), mask.reshape(members, -1, *mask.shape[1:])


@pytest.mark.parametrize("momentum", [0.9, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("api", APIS)
def test_fully_masked_batch_across_members_leaves_running_statistics_unchanged(api, momentum):
    xs, masks = _members(_data((16, 3), loc=2.0), np.zeros((16, 3), bool))
    start = _known_running_statistics(3, momentum)
    if api == "linen":
        module = jl.BatchNorm(use_running_average=False, momentum=momentum, axis_name="batch")
        variables = {"params": module.init(KEY, xs[0])["params"], "batch_stats": start}

        carried = variables

        def member(xb, mb, variables):
            return _linen_train(module, variables, xb, mask=mb)[1]
    else:
        model = _nnx_module(jx, "BatchNorm", (3,), momentum=momentum, axis_name="batch")
        model.mean[...], model.var[...] = start["mean"], start["var"]
        if momentum is None:
            model.count[...] = start["count"]
        graphdef, carried = nnx.split(model)

        def member(xb, mb, state):
            replica = nnx.merge(graphdef, state)
            replica(xb, mask=mb)
            return _nnx_stats(replica)

    # the module state travels as an unmapped argument, so each member merges its own copy
    stats = jax.jit(jax.vmap(member, in_axes=(0, 0, None), axis_name="batch"))(
        xs, masks, carried
    )
    _assert_trees_equal(stats, jax.tree.map(lambda a: jnp.stack([a] * 4), start))


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_running_statistics_track_the_data_as_flax(param_dtype):
    """Data with mean 3.0 / var 1.21: each EMA step rounded back to half precision stalls
    (bfloat16: 2.1 / 1.01 after 2,000 steps); Flax's update is float32 and tracks it."""
    steps = 600
    xs = _data((steps, 32, 4), seed=2, loc=3.0, spread=1.1)

    def track(lib):
        module = lib.BatchNorm(
            use_running_average=False, param_dtype=param_dtype, force_float32_reductions=False
        )
        variables = module.init(KEY, xs[0])
        step = jax.jit(lambda stats, xb: _linen_train(
            module, {"params": variables["params"], "batch_stats": stats}, xb)[1])
        stats = variables["batch_stats"]
        for xb in xs:
            stats = step(stats, xb)
        return stats

    ours, theirs = track(jl), track(fnn)
    np.testing.assert_allclose(np.asarray(theirs["mean"]), 3.0, atol=0.1)
    for name in ("mean", "var"):
        assert ours[name].dtype == theirs[name].dtype
        np.testing.assert_allclose(
            np.asarray(ours[name], np.float32), np.asarray(theirs[name], np.float32), atol=2e-3
        )


# --------------------------------------------------------------------------------------
# NaN and inf that the mask should have stopped
# --------------------------------------------------------------------------------------

# Masked positions reach no sum: a NaN/inf there must not reach the statistics (RMSNorm with a
# mask, and every layer with use_fast_variance=True, Flax's default, leaked it).

# (layer, NNX positional features, keyword arguments); x has shape (4, 3, 6)
MASKED_NAN_CASES = [
    pytest.param("RMSNorm", (6,), {}, id="rms"),
    pytest.param("LayerNorm", (6,), {"use_fast_variance": True}, id="layer-fast"),
    pytest.param("LayerNorm", (6,), {"use_fast_variance": False}, id="layer"),
    pytest.param("GroupNorm", (6,), {"num_groups": 2, "use_fast_variance": True},
                 id="group-fast"),
    pytest.param("GroupNorm", (6,), {"num_groups": 2, "use_fast_variance": False},
                 id="group"),
    pytest.param("InstanceNorm", (6,), {"use_fast_variance": True}, id="instance-fast"),
    pytest.param("InstanceNorm", (6,), {"use_fast_variance": False}, id="instance"),
    pytest.param("BatchNorm", (6,), {"use_fast_variance": True, "use_running_average": False},
                 id="batch-fast"),
    pytest.param("BatchNorm", (6,), {"use_fast_variance": False, "use_running_average": False},
                 id="batch"),
]


def _nan_at_masked_positions(shape=(4, 3, 6), seed=11):
    x = _data(shape, seed=seed, loc=1.0)
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask[:, :2, :] = True  # every reduction set keeps at least two values
    mask[..., :2] = True
    return x, np.where(mask, x, np.nan).astype(np.float32), mask


@pytest.mark.parametrize(("name", "features", "kwargs"), MASKED_NAN_CASES)
@pytest.mark.parametrize("api", APIS)
def test_nan_at_masked_positions_does_not_reach_the_output(api, name, features, kwargs):
    _, x, mask = _nan_at_masked_positions()
    if api == "linen":
        ours, theirs = getattr(jl, name)(**kwargs), getattr(fnn, name)(**kwargs)
        variables = theirs.init(KEY, np.nan_to_num(x))
        y, ours_vars = _linen_apply(ours, variables, x, mask=mask)
        expected, theirs_vars = _linen_apply(theirs, variables, x, mask=mask)
    else:
        ours, theirs = (_nnx_module(lib, name, features, **kwargs) for lib in (jx, nnx))
        y, expected = _nnx_output(ours, x, mask=mask), _nnx_output(theirs, x, mask=mask)
        ours_vars, theirs_vars = nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat)
    assert np.isfinite(np.asarray(expected)[mask]).all()
    # Outputs of size <= 3 from float32 sums in different orders (XLA:GPU reduces in trees):
    # 2e-5 (~2^-17 relative); the fast variance E[x^2] - E[x]^2 (mean 1, std 1) doubles the
    # round-off of the variance, so its cases get twice that
    atol = 4e-5 if kwargs.get("use_fast_variance") else 2e-5
    np.testing.assert_allclose(np.asarray(y)[mask], np.asarray(expected)[mask], atol=atol)
    for ours_leaf, theirs_leaf in zip(
        jax.tree.leaves(ours_vars), jax.tree.leaves(theirs_vars), strict=True
    ):
        np.testing.assert_allclose(np.asarray(ours_leaf), np.asarray(theirs_leaf), atol=2e-6)


def _masked_reference(clean, mask, axes, centered):
    """float64 masked mean / variance (or mean square) of ``clean`` over ``axes``."""
    values = np.where(mask, clean.astype(np.float64), 0.0)
    count = mask.sum(axis=axes, keepdims=True)
    mean = values.sum(axis=axes, keepdims=True) / count
    if not centered:
        return np.zeros_like(mean), (values**2).sum(axis=axes, keepdims=True) / count
    deviation = np.where(mask, clean - mean, 0.0)
    return mean, (deviation**2).sum(axis=axes, keepdims=True) / count


FUNCTIONAL_NAN_CASES = ["rms_norm", "normalize-fast", "moments-fast", "layer_norm"]


@pytest.mark.parametrize("case", FUNCTIONAL_NAN_CASES)
def test_functional_nan_at_masked_positions_does_not_reach_the_output(case):
    clean, x, mask = _nan_at_masked_positions()
    mean, var = _masked_reference(clean, mask, (2,), centered=case != "rms_norm")
    if case.startswith("moments"):
        got_mean, got_var = jaxnorm.moments(x, 2, mask=mask, keepdims=True, fast_variance=True)
        np.testing.assert_allclose(got_mean, mean, atol=1e-6)
        np.testing.assert_allclose(got_var, var, rtol=1e-5)
        return
    if case == "rms_norm":
        y = jaxnorm.rms_norm(x, mask=mask, eps=1e-6)
    elif case == "layer_norm":
        y = jaxnorm.layer_norm(x, mask=mask, eps=1e-6)
    else:
        y = jaxnorm.normalize(x, 2, mask=mask, eps=1e-6, fast_variance=True)
    expected = (clean - mean) / np.sqrt(var + 1e-6)
    np.testing.assert_allclose(np.asarray(y)[mask], expected[mask], rtol=1e-4, atol=1e-5)


# A fully masked reduction set outputs exactly bias (0 without bias) in every layer and dtype
# (was x/sqrt(eps): inf in float16, NaN after y*mask).

# layer -> (NNX positional features, keyword arguments, index of the fully masked set in an
# x of shape (4, 5, 6)); the set is the whole reduction set of one statistic.
FULLY_MASKED_LAYERS = {
    "LayerNorm": ((6,), {}, (1, 2, slice(None))),
    "RMSNorm": ((6,), {}, (1, 2, slice(None))),
    "InstanceNorm": ((6,), {}, (1, slice(None), 3)),
    "GroupNorm": ((6,), {"num_groups": 2}, (1, slice(None), slice(0, 3))),
    "BatchNorm": ((6,), {"use_running_average": False}, (slice(None), slice(None), 2)),
}


def _fully_masked_input(index, dtype):
    x = _data((4, 5, 6), seed=4, spread=300.0).astype(dtype)  # x / sqrt(eps) overflows float16
    mask = np.ones(x.shape, bool)
    mask[index] = False
    return x, mask


def _expected_at(bias, index, shape, dtype):
    """``bias`` (0 when None) broadcast over ``shape[index]``, as ``dtype`` values."""
    full = np.zeros(shape, np.float32)
    if bias is not None:
        full = full + np.asarray(jnp.asarray(bias).astype(dtype), np.float32)
    return full[index]


def _module_output(api, name, dtype, x, mask, use_bias=True):
    """Output and bias of ``name`` (all in ``dtype``) with a random nonzero bias."""
    features, kwargs, _ = FULLY_MASKED_LAYERS[name]
    kwargs = {**kwargs, "param_dtype": dtype}
    if name != "RMSNorm":
        kwargs["use_bias"] = use_bias
    if api == "linen":
        module = getattr(jl, name)(**kwargs, bias_init=fnn.initializers.normal(1.0)) \
            if name != "RMSNorm" else jl.RMSNorm(**kwargs)
        y, variables = _linen_output(module, x, mask=mask)  # BatchNorm: training mode
        return y, variables["params"].get("bias")
    if name != "RMSNorm":
        kwargs["bias_init"] = nnx.initializers.normal(1.0)
    module = _nnx_module(jx, name, features, **kwargs)
    bias = None if getattr(module, "bias", None) is None else module.bias[...]
    return _nnx_output(module, x, mask=mask), bias


def _functional_output(name, dtype, x, mask):
    """Output and bias of the functional form, with scale/bias arrays in ``dtype``."""
    rng = np.random.default_rng(8)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 6), dtype)
    bias = jnp.asarray(rng.standard_normal(6), dtype)
    if name == "LayerNorm":
        return jaxnorm.layer_norm(x, scale, bias, mask=mask), bias
    if name == "RMSNorm":
        return jaxnorm.rms_norm(x, scale, mask=mask), None
    if name == "InstanceNorm":
        return jaxnorm.instance_norm(x, scale, bias, mask=mask), bias
    if name == "GroupNorm":
        return jaxnorm.group_norm(x, scale, bias, num_groups=2, mask=mask), bias
    return jaxnorm.batch_norm(x, scale, bias, mask=mask)[0], bias


@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("api", ["linen", "nnx", "functional"])
@pytest.mark.parametrize("name", list(FULLY_MASKED_LAYERS))
def test_fully_masked_set_outputs_exactly_bias(name, api, dtype):
    index = FULLY_MASKED_LAYERS[name][2]
    x, mask = _fully_masked_input(index, dtype)
    if api == "functional":
        y, bias = _functional_output(name, dtype, x, mask)
    else:
        y, bias = _module_output(api, name, dtype, x, mask)
    assert y.dtype == jnp.dtype(dtype)
    assert np.isfinite(np.asarray(y, np.float32)).all()
    np.testing.assert_array_equal(
        np.asarray(y[index], np.float32), _expected_at(bias, index, x.shape, dtype)
    )


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name", ["LayerNorm", "InstanceNorm", "GroupNorm", "BatchNorm"])
def test_fully_masked_set_outputs_zero_without_bias(name, api):
    index = FULLY_MASKED_LAYERS[name][2]
    x, mask = _fully_masked_input(index, jnp.float16)
    y, bias = _module_output(api, name, jnp.float16, x, mask, use_bias=False)
    assert bias is None
    np.testing.assert_array_equal(np.asarray(y[index], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(y * mask, np.float32)[index], 0.0)  # no NaN


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name", ["BatchRenorm", "ConditionalInstanceNorm"])
def test_fully_masked_set_outputs_exactly_bias_in_the_other_layers(name, api):
    x = _data((4, 5, 6), seed=4, spread=300.0)
    mask = np.ones(x.shape, bool)
    if name == "BatchRenorm":
        index = (slice(None), slice(None), 2)
        kwargs = {"use_running_average": False}
        args, features = (), (6,)
    else:
        index = (1, slice(None), 3)
        kwargs = {"num_styles": 3} if api == "linen" else {}
        args, features = (jnp.asarray([0, 2, 1, 0]),), (6, 3)
    mask[index] = False
    if api == "linen":
        module = getattr(jl, name)(**kwargs, bias_init=fnn.initializers.normal(1.0))
        y, variables = _linen_output(module, x, *args, mask=mask)
        bias = variables["params"]["bias"]
    else:
        module = _nnx_module(jx, name, features, **kwargs,
                             bias_init=nnx.initializers.normal(1.0))
        y, bias = _nnx_output(module, x, *args, mask=mask), module.bias[...]
    expected = bias[2] if name == "BatchRenorm" else bias[2, 3]  # sample 1 has style 2
    np.testing.assert_array_equal(np.asarray(y[index]), np.full(y[index].shape, expected))


# --------------------------------------------------------------------------------------
# Crashes and silent wrong answers
# --------------------------------------------------------------------------------------

# Empty batches (GroupNorm, InstanceNorm) and BatchNorm with 0 channels return an empty array
# of the right shape, as Flax does (were a crash: `max` over an empty array).

EMPTY_CASES = [
    # (layer, NNX positional features, keyword arguments, input shape)
    ("GroupNorm", (8,), {"num_groups": 2}, (0, 4, 4, 8)),
    ("InstanceNorm", (8,), {}, (0, 4, 4, 8)),
    ("BatchNorm", (0,), {"use_running_average": False}, (8, 0)),
    ("BatchNorm", (0,), {"use_running_average": False}, (5, 3, 0)),
]


@pytest.mark.parametrize(("name", "features", "kwargs", "shape"), EMPTY_CASES,
                         ids=[f"{c[0]}-{c[3]}" for c in EMPTY_CASES])
@pytest.mark.parametrize("api", APIS)
def test_empty_input_returns_an_empty_array_as_flax(api, name, features, kwargs, shape):
    x = np.zeros(shape, np.float32)
    if api == "linen":
        ours, theirs = getattr(jl, name)(**kwargs), getattr(fnn, name)(**kwargs)
        expected, variables = theirs.init_with_output(KEY, x)
        ours_vars = ours.init(KEY, x)
        y, updated = ours.apply(variables, x, mutable=True)
        expected_updated = theirs.apply(variables, x, mutable=True)[1]
    else:
        ours, theirs = (_nnx_module(lib, name, features, **kwargs) for lib in (jx, nnx))
        y, expected = ours(x), theirs(x)
        ours_vars, variables = nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param)
        updated, expected_updated = nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat)
    assert y.shape == expected.shape == shape
    assert y.dtype == expected.dtype
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)
    assert shapes(ours_vars) == shapes(variables)
    assert shapes(updated) == shapes(expected_updated)


@pytest.mark.parametrize("name", ["group_norm", "instance_norm", "batch_norm"])
def test_functional_empty_input_returns_an_empty_array(name):
    if name == "batch_norm":
        x = np.zeros((8, 0), np.float32)
        y, mean, var = jaxnorm.batch_norm(x)
        assert mean.shape == var.shape == (0,)
    else:
        x = np.zeros((0, 4, 4, 8), np.float32)
        y = jaxnorm.group_norm(x, num_groups=2) if name == "group_norm" else jaxnorm.instance_norm(x)
    assert y.shape == x.shape
    assert y.dtype == x.dtype


# Out-of-range style ids under jit: NaN for that sample (or a clear error), never another
# style's output.


def _check_out_of_range_styles(run):
    """``run(ids)`` under jit with ids 7 and -1 (of 4 styles): those samples are NaN (or
    a clear error is raised), the others equal their eager output."""
    ids = jnp.asarray([0, 7, -1, 2])
    valid = run(jnp.asarray([0, 1, 1, 2]), jit=False)
    try:
        y = run(ids, jit=True)
    except (ValueError, RuntimeError) as error:  # a checkify-style error: it must say why
        assert "style" in str(error)
        return
    y = np.asarray(y)
    assert np.isnan(y[1]).all() and np.isnan(y[2]).all()
    np.testing.assert_allclose(y[[0, 3]], np.asarray(valid)[[0, 3]], rtol=1e-6)


@pytest.mark.parametrize("api", APIS)
def test_conditional_instance_norm_out_of_range_style_under_jit_is_never_another_style(api):
    x = _data((4, 5, 3), seed=6)
    if api == "linen":
        module = jl.ConditionalInstanceNorm(
            num_styles=4, scale_init=fnn.initializers.normal(1.0),
            bias_init=fnn.initializers.normal(1.0),
        )
        variables = module.init(KEY, x, jnp.zeros((4,), jnp.int32))

        def run(ids, jit):
            apply = jax.jit(module.apply) if jit else module.apply
            return apply(variables, x, ids)
    else:
        module = _nnx_module(
            jx, "ConditionalInstanceNorm", (3, 4), scale_init=nnx.initializers.normal(1.0),
            bias_init=nnx.initializers.normal(1.0),
        )

        def run(ids, jit):
            return (nnx.jit(lambda m, x, i: m(x, i)) if jit else lambda m, x, i: m(x, i))(
                module, x, ids
            )

    _check_out_of_range_styles(run)


def test_conditional_instance_norm_out_of_range_style_eagerly_is_an_error():
    x = _data((4, 5, 3), seed=6)
    module = jl.ConditionalInstanceNorm(num_styles=4)
    variables = module.init(KEY, x, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="style"):
        module.apply(variables, x, jnp.asarray([0, 7, 1, 2]))


# Arguments that silently diverged: clear errors naming momentum, r_max/d_max, eps, axis.


def _train_once(api, name, **kwargs):
    """Builds ``name`` and runs one training step on a small batch."""
    x = _data((8, 3))
    if api == "linen":
        module = getattr(jl, name)(use_running_average=False, **kwargs)
        return module.apply(module.init(KEY, x), x, mutable=["batch_stats"])
    return _nnx_module(jx, name, (3,), use_running_average=False, **kwargs)(x)


@pytest.mark.parametrize("momentum", [1.5, -0.1, float("nan")])
@pytest.mark.parametrize("api", APIS)
def test_momentum_outside_the_unit_interval_is_an_error_naming_it(api, momentum):
    with pytest.raises(ValueError, match="momentum"):
        _train_once(api, "BatchNorm", momentum=momentum)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_at_the_ends_of_the_unit_interval_matches_flax(momentum):
    x = _data((8, 3), loc=1.0)
    ours, theirs = (lib.BatchNorm(use_running_average=False, momentum=momentum)
                    for lib in (jl, fnn))
    variables = theirs.init(KEY, x)
    _, stats = _linen_train(ours, variables, x)
    _, expected = _linen_train(theirs, variables, x)
    for name in ("mean", "var"):
        np.testing.assert_allclose(stats[name], expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("limits", "named"), [
    ({"r_max": 0.5}, "r_max"), ({"r_max": 0.0}, "r_max"), ({"d_max": -1.0}, "d_max"),
])
@pytest.mark.parametrize("api", APIS)
def test_batch_renorm_limits_out_of_range_are_an_error_naming_them(api, limits, named):
    with pytest.raises(ValueError, match=named):
        _train_once(api, "BatchRenorm", **limits)


BAD_EPS = {
    "vector": np.array([1e-5, 1e-3, 1.0], np.float32),
    "None": None,
    "str": "1e-5",
}


@pytest.mark.parametrize("bad", list(BAD_EPS))
@pytest.mark.parametrize("where", ["layer_norm", "batch_norm", "linen.LayerNorm",
                                   "nnx.BatchNorm"])
def test_eps_that_is_not_a_number_is_an_error_naming_it(where, bad):
    x, eps = _data((4, 3)), BAD_EPS[bad]
    with pytest.raises((TypeError, ValueError), match="eps"):
        if where == "layer_norm":
            jaxnorm.layer_norm(x, eps=eps)
        elif where == "batch_norm":
            jaxnorm.batch_norm(x, eps=eps)
        elif where == "linen.LayerNorm":
            jl.LayerNorm(epsilon=eps).init(KEY, x)
        else:
            _nnx_module(jx, "BatchNorm", (3,), epsilon=eps, use_running_average=False)(x)


@pytest.mark.parametrize("where", ["batch_norm", "normalize", "linen.BatchNorm",
                                   "linen.LayerNorm", "nnx.BatchNorm"])
def test_boolean_axis_is_an_error_naming_it(where):
    x = _data((4, 3))
    with pytest.raises((TypeError, ValueError), match="axis|axes"):
        if where == "batch_norm":
            jaxnorm.batch_norm(x, axis=True)
        elif where == "normalize":
            jaxnorm.normalize(x, True)
        elif where == "linen.BatchNorm":
            jl.BatchNorm(use_running_average=False, axis=True).init(KEY, x)
        elif where == "linen.LayerNorm":
            jl.LayerNorm(reduction_axes=True).init(KEY, x)
        else:
            _nnx_module(jx, "BatchNorm", (3,), axis=True, use_running_average=False)(x)


# --------------------------------------------------------------------------------------
# Drop-in breaks found by Flax's own tests
# --------------------------------------------------------------------------------------

# Training on a batch of one: Flax outputs bias and still updates the statistics.


@pytest.mark.parametrize("shape", [(1, 4), (1, 1, 1, 4)])
@pytest.mark.parametrize("api", APIS)
def test_training_on_a_batch_of_one_matches_flax(api, shape):
    x = _data(shape, seed=9, loc=2.0)
    if api == "linen":
        ours, theirs = (lib.BatchNorm(use_running_average=False, momentum=0.9,
                                      bias_init=fnn.initializers.normal(1.0))
                        for lib in (jl, fnn))
        variables = theirs.init(KEY, x)
        y, stats = _linen_train(ours, variables, x)
        expected, expected_stats = _linen_train(theirs, variables, x)
        bias = variables["params"]["bias"]
    else:
        ours, theirs = (_nnx_module(lib, "BatchNorm", (4,), momentum=0.9,
                                    bias_init=nnx.initializers.normal(1.0))
                        for lib in (jx, nnx))
        ours.bias[...] = theirs.bias[...]
        y, expected = ours(x), theirs(x)
        stats, expected_stats = _nnx_stats(ours), _nnx_stats(theirs)
        bias = theirs.bias[...]
    np.testing.assert_allclose(expected, np.broadcast_to(bias, shape), atol=1e-6)
    np.testing.assert_allclose(y, expected, atol=1e-6)
    for name in ("mean", "var"):
        np.testing.assert_allclose(stats[name], expected_stats[name], rtol=1e-6, atol=1e-7)


def test_functional_batch_norm_on_a_batch_of_one_outputs_bias_when_allowed():
    """The functional form asks for ``allow_single_value=True`` (the modules pass it)."""
    x = _data((1, 4), seed=9, loc=2.0)
    bias = jnp.asarray([0.5, -1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="allow_single_value"):
        jaxnorm.batch_norm(x, jnp.full((4,), 3.0), bias)
    y, mean, var = jaxnorm.batch_norm(x, jnp.full((4,), 3.0), bias, allow_single_value=True)
    np.testing.assert_array_equal(y, bias[None])
    np.testing.assert_allclose(mean, x[0], rtol=1e-7)
    np.testing.assert_array_equal(var, 0.0)


# Integer inputs: the modules promote them to float as Flax does (the functional API asks
# for floating input); complex inputs: Flax's |x|^2 variance.

# (layer, NNX positional features, keyword arguments, input shape)
PROMOTION_CASES = [
    ("BatchNorm", (4,), {"use_running_average": False}, (6, 3, 4)),
    ("LayerNorm", (4,), {}, (6, 3, 4)),
    ("RMSNorm", (4,), {}, (6, 3, 4)),
    ("GroupNorm", (4,), {"num_groups": 2}, (6, 3, 4)),
    ("InstanceNorm", (4,), {}, (6, 3, 4)),
]


def _compare_with_flax(api, name, features, kwargs, x, rtol):
    """Output, its dtype and (BatchNorm) running statistics of ours against Flax's."""
    if api == "linen":
        ours, theirs = getattr(jl, name)(**kwargs), getattr(fnn, name)(**kwargs)
        variables = theirs.init(KEY, x)
        y, ours_vars = _linen_apply(ours, variables, x)
        expected, theirs_vars = _linen_apply(theirs, variables, x)
    else:
        ours, theirs = (_nnx_module(lib, name, features, **kwargs) for lib in (jx, nnx))
        y, expected = _nnx_output(ours, x), _nnx_output(theirs, x)
        ours_vars, theirs_vars = (
            (_nnx_stats(ours), _nnx_stats(theirs)) if name == "BatchNorm" else ({}, {})
        )
    assert y.dtype == expected.dtype
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=rtol, atol=rtol)
    ours_leaves, theirs_leaves = jax.tree.leaves(ours_vars), jax.tree.leaves(theirs_vars)
    assert len(ours_leaves) == len(theirs_leaves)
    for a, b in zip(ours_leaves, theirs_leaves, strict=True):
        assert a.dtype == b.dtype  # the checkpoint keeps Flax's dtypes
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol)


@pytest.mark.parametrize(("name", "features", "kwargs", "shape"), PROMOTION_CASES,
                         ids=[c[0] for c in PROMOTION_CASES])
@pytest.mark.parametrize("api", APIS)
def test_integer_input_is_promoted_as_flax(api, name, features, kwargs, shape):
    x = np.random.default_rng(1).integers(-20, 20, shape).astype(np.int32)
    _compare_with_flax(api, name, features, kwargs, x, rtol=1e-5)


# NNX assigns the complex batch mean into the float32 BatchStat (Flax's own layer does too):
# JAX warns that the imaginary part is dropped.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")
@pytest.mark.filterwarnings("ignore:Casting complex values to real")
@pytest.mark.parametrize(("api", "name", "features", "kwargs", "shape"), [
    pytest.param(api, *case, id=f"{api}-{case[0]}")
    for api in APIS for case in PROMOTION_CASES
    if case[0] in ("BatchNorm", "LayerNorm", "GroupNorm")
])
def test_complex_input_matches_flax(api, name, features, kwargs, shape):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape) + (1 - 2j))
    _compare_with_flax(api, name, features, kwargs, x.astype(np.complex64), rtol=1e-5)


# nn.tabulate lists only module calls: no row for a helper method such as _renorm_limits.
CONSOLE = {"force_terminal": False, "no_color": True, "width": 300}


class _TwoCalls(fnn.Module):
    """One norm layer called twice (its second call is a repeated row)."""

    norm: fnn.Module

    @fnn.compact
    def __call__(self, x):
        return self.norm(self.norm(x))


@pytest.mark.parametrize("use_running_average", [False, True])
def test_tabulate_of_batch_norm_equals_flax(use_running_average):
    x = jnp.ones((4, 3))
    tables = [
        _TwoCalls(lib.BatchNorm(use_running_average=use_running_average)).tabulate(
            KEY, x, show_repeated=True, console_kwargs=CONSOLE)
        for lib in (jl, fnn)
    ]
    assert tables[0] == tables[1]


def test_tabulate_of_batch_renorm_lists_only_its_calls():
    table = _TwoCalls(jl.BatchRenorm(use_running_average=False)).tabulate(
        KEY, jnp.ones((4, 3)), show_repeated=True, console_kwargs=CONSOLE)
    rows = [line for line in table.splitlines() if "BatchRenorm" in line]
    assert len(rows) == 2
    assert "_renorm_limits" not in table


# nnx.view_info parses set_view's Args: section (was KeyError 'use_running_average').


class _Block(nnx.Module):
    def __init__(self, norm: nnx.Module):
        self.norm = norm
        self.dropout = nnx.Dropout(0.1)


@pytest.mark.parametrize("name", ["BatchNorm", "BatchRenorm"])
def test_view_info_documents_use_running_average_as_flax(name):
    info = nnx.view_info(_Block(_nnx_module(jx, name, (3,))))
    flax_info = nnx.view_info(_Block(_nnx_module(nnx, "BatchNorm", (3,))))
    lines = info.splitlines()
    assert info.count(f"{name}:") == 1 and info.count("Dropout:") == 1
    signature = "  use_running_average: bool | None = None"
    assert signature in flax_info.splitlines()
    at = lines.index(signature)
    assert lines[at + 1].strip()  # the argument's description follows
    assert "set_view" not in info  # parsed from the Args: section, not the raw signature


def test_view_switches_use_running_average_as_flax():
    model = _Block(_nnx_module(jx, "BatchNorm", (3,)))
    evaluation = nnx.view(model, use_running_average=True, deterministic=True)
    assert evaluation.norm.use_running_average is True
    assert model.norm.use_running_average is False
    x = _data((4, 3), loc=5.0)
    np.testing.assert_allclose(evaluation.norm(x), x / np.sqrt(1 + 1e-5), rtol=1e-6)
