"""jaxnorm.linen: drop-in for flax.linen (variables both ways) and the BatchNorm options."""

from __future__ import annotations

import functools

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import linen as jn

KEY = jax.random.key(0)


def _data(shape, seed=1, loc=2.0, spread=3.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * spread + loc).astype(np.float32)


def _randomized(variables, seed=7):
    """The same tree (arrays or shapes) with random values in [0.5, 1.5) (integer leaves:
    0), so that loading a leaf into the wrong place cannot go unnoticed."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)

    return jax.tree.map(fill, variables)


def shapes(module, *args, **kwargs):
    """The variables ``module.init`` would create, as shapes (traced, not compiled)."""
    return jax.eval_shape(functools.partial(module.init, **kwargs), KEY, *args)


def init(module, *args, **kwargs):
    """``module.init`` under ``jit``: one compile instead of one per operation."""
    return jax.jit(functools.partial(module.init, **kwargs))(KEY, *args)


def run(module, variables, *args, **kwargs):
    """``module.apply`` under ``jit``."""
    return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def _signature(tree):
    return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), tree)


DROP_IN_CASES = [
    ("BatchNorm", {"use_running_average": False, "momentum": 0.9}, (6, 3, 3, 4)),
    ("BatchNorm", {"use_running_average": False, "axis": 1}, (5, 4, 3)),
    ("BatchNorm", {"use_running_average": False, "use_bias": False, "param_dtype": jnp.bfloat16},
     (8, 4)),
    (
        "BatchNorm",
        {"use_running_average": False, "force_float32_reductions": False,
         "param_dtype": jnp.bfloat16},
        (8, 4),
    ),
    ("LayerNorm", {}, (4, 3, 5)),
    ("LayerNorm", {"reduction_axes": (1, 2), "feature_axes": (1, 2), "use_scale": False}, (4, 3, 5)),
    ("RMSNorm", {}, (4, 3, 5)),
    ("GroupNorm", {"num_groups": 2}, (3, 4, 4, 6)),
    ("GroupNorm", {"num_groups": None, "group_size": 3, "reduction_axes": (2, 3)}, (3, 4, 4, 6)),
    ("InstanceNorm", {}, (3, 4, 4, 6)),
    ("InstanceNorm", {"feature_axes": (1, -1)}, (3, 2, 4, 6)),
]
CASE_IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(DROP_IN_CASES)]


@pytest.mark.parametrize(("name", "kwargs", "shape"), DROP_IN_CASES, ids=CASE_IDS)
def test_variable_tree_matches_flax(name, kwargs, shape):
    x = _data(shape)
    ours = init(getattr(jn, name)(**kwargs), x)
    theirs = init(getattr(fnn, name)(**kwargs), x)
    assert _signature(ours) == _signature(theirs)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), ours, theirs))


def _assert_close_statistics(ours, theirs, half_statistics=False):
    """Running statistics agree; bfloat16 ones (force_float32_reductions=False) to its
    precision. (Both turn a bfloat16 statistic float32 when updated; Flax multiplies the
    old value by the momentum in bfloat16 first, jaxnorm in float32.)"""
    half = half_statistics or jnp.bfloat16 in (ours.dtype, theirs.dtype)
    tol = 1e-2 if half else 1e-5
    np.testing.assert_allclose(
        np.asarray(ours, np.float32), np.asarray(theirs, np.float32), rtol=tol, atol=tol / 10
    )


@pytest.mark.parametrize(("name", "kwargs", "shape"), DROP_IN_CASES, ids=CASE_IDS)
def test_variables_load_both_ways_with_the_same_outputs(name, kwargs, shape):
    x = _data(shape)
    ours, theirs = getattr(jn, name)(**kwargs), getattr(fnn, name)(**kwargs)
    for source in (ours, theirs):
        variables = _randomized(shapes(source, x))
        y_ours, state_ours = run(ours, variables, x, mutable=["batch_stats"])
        y_theirs, state_theirs = run(theirs, variables, x, mutable=["batch_stats"])
        assert y_ours.dtype == y_theirs.dtype
        half = jnp.bfloat16 in (y_ours.dtype, kwargs.get("param_dtype"))
        tol = 2e-2 if half else 2e-5  # Flax rounds through bfloat16 params and statistics
        np.testing.assert_allclose(y_ours, y_theirs, rtol=tol, atol=tol)
        half_statistics = kwargs.get("force_float32_reductions") is False
        jax.tree.map(functools.partial(_assert_close_statistics, half_statistics=half_statistics),
                     state_ours, state_theirs)
        if "use_running_average" in kwargs:
            evaluate = dict(kwargs, use_running_average=True)
            np.testing.assert_allclose(
                run(getattr(jn, name)(**evaluate), variables, x),
                run(getattr(fnn, name)(**evaluate), variables, x),
                rtol=tol, atol=tol,
            )


def _bn(**kwargs):
    return jn.BatchNorm(use_running_average=False, **kwargs)


def test_init_does_not_move_running_statistics():
    x = _data((8, 3), loc=5.0)
    stats = init(_bn(), x)["batch_stats"]
    np.testing.assert_array_equal(stats["mean"], np.zeros(3))
    np.testing.assert_array_equal(stats["var"], np.ones(3))


def test_running_statistics_follow_flax_momentum_convention():
    x = _data((16, 3))
    variables = _randomized(shapes(_bn(momentum=0.8), x))
    _, updated = run(_bn(momentum=0.8), variables, x, mutable=["batch_stats"])
    old = variables["batch_stats"]
    np.testing.assert_allclose(
        updated["batch_stats"]["mean"], 0.8 * old["mean"] + 0.2 * x.mean(0), rtol=1e-6
    )
    np.testing.assert_allclose(
        updated["batch_stats"]["var"], 0.8 * old["var"] + 0.2 * x.var(0), rtol=1e-5
    )


def test_unbiased_running_var_stores_bessel_corrected_variance():
    x = _data((10, 2, 3))
    module = _bn(momentum=0.0, unbiased_running_var=True)
    _, updated = run(module, init(module, x), x, mutable=["batch_stats"])
    expected = x.reshape(-1, 3).var(0, ddof=1)
    np.testing.assert_allclose(updated["batch_stats"]["var"], expected, rtol=1e-5)


def test_evaluation_uses_running_statistics():
    x = _data((6, 4))
    variables = _randomized(shapes(_bn(), x))
    y = run(jn.BatchNorm(use_running_average=True), variables, x)
    stats, params = variables["batch_stats"], variables["params"]
    expected = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"] + params[
        "bias"
    ]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_use_running_average_in_call_and_constructor_is_an_error_like_flax():
    x = _data((6, 4))
    variables = _randomized(shapes(jn.BatchNorm(), x, use_running_average=True))
    with pytest.raises(ValueError, match="use_running_average"):
        jn.BatchNorm().apply(variables, x)
    with pytest.raises(ValueError, match="use_running_average"):
        jn.BatchNorm(use_running_average=True).apply(variables, x, use_running_average=False)


def test_momentum_none_keeps_the_exact_average_of_batch_statistics_with_a_count():
    batches = [_data((8, 3), seed=s, loc=s) for s in range(3)]
    module = _bn(momentum=None)
    step = jax.jit(functools.partial(module.apply, mutable=["batch_stats"]))
    variables = init(module, batches[0])
    assert variables["batch_stats"]["count"] == 0
    for x in batches:
        _, updated = step(variables, x)
        variables = {**variables, **updated}
    stats = variables["batch_stats"]
    assert int(stats["count"]) == 3
    np.testing.assert_allclose(stats["mean"], np.mean([b.mean(0) for b in batches], 0), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], np.mean([b.var(0) for b in batches], 0), rtol=1e-5)


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_ghost_batch_norm_equals_batch_norm_per_group(unbiased):
    x = _data((12, 2, 3))
    settings = {"momentum": 0.5, "unbiased_running_var": unbiased}
    variables = _randomized(shapes(_bn(**settings), x))
    y, updated = run(
        _bn(**settings, virtual_batch_size=4), variables, x, mutable=["batch_stats"]
    )
    per_group = jax.jit(functools.partial(_bn(**settings).apply, mutable=["batch_stats"]))
    groups = [per_group(variables, x[i : i + 4]) for i in range(0, 12, 4)]
    np.testing.assert_allclose(y, np.concatenate([g[0] for g in groups]), rtol=1e-5, atol=1e-5)
    for name in ("mean", "var"):
        group_average = np.mean([g[1]["batch_stats"][name] for g in groups], axis=0)
        np.testing.assert_allclose(updated["batch_stats"][name], group_average, rtol=1e-5)


def test_ghost_batch_size_must_divide_the_batch():
    x = _data((10, 3))
    with pytest.raises(ValueError, match="virtual_batch_size"):
        shapes(_bn(virtual_batch_size=4), x)


def test_training_batch_norm_with_one_value_per_channel_behaves_as_flax():
    # Flax's own tests (nn.scan/nn.vmap, tabulate on a batch of one) train on one value per
    # channel: the output is `bias` and the statistics move towards (x, 0). The functional
    # jaxnorm.batch_norm still raises unless allow_single_value=True (tests/test_errors.py).
    x = _data((1, 3), loc=2.0)
    variables = _randomized(init(_bn(), np.ones((2, 3), np.float32)))
    y, state = _bn().apply(variables, x, mutable=["batch_stats"])
    y_flax, state_flax = fnn.BatchNorm(use_running_average=False).apply(
        variables, x, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y, np.broadcast_to(variables["params"]["bias"], (1, 3)),
                               rtol=1e-6)
    np.testing.assert_allclose(y, y_flax, rtol=1e-6, atol=1e-6)
    for name in ("mean", "var"):
        np.testing.assert_allclose(state["batch_stats"][name], state_flax["batch_stats"][name],
                                   rtol=1e-6)


def test_init_with_a_batch_of_one_works_as_in_flax():
    # `model.init(key, jnp.ones((1, F)), train=True)` is a common Flax idiom; init does not
    # move the statistics, so it has no use for the batch's spread.
    x = np.ones((1, 3), np.float32)
    ours = init(_bn(), x)
    theirs = init(fnn.BatchNorm(use_running_average=False), x)
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_masked_statistics_equal_statistics_of_the_kept_rows():
    x = _data((10, 3))
    keep = np.arange(10) % 3 != 0
    module = _bn(momentum=0.0, unbiased_running_var=True)
    variables = _randomized(shapes(module, x))
    y, updated = run(module, variables, x, mask=keep[:, None], mutable=["batch_stats"])
    y_kept, updated_kept = run(module, variables, x[keep], mutable=["batch_stats"])
    np.testing.assert_allclose(y[keep], y_kept, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), updated, updated_kept)


def test_stable_statistics_for_large_mean_by_default():
    x = _data((64, 4), loc=1e4, spread=1.0).astype(np.float32)
    exact = (x.astype(np.float64) - x.astype(np.float64).mean(0)) / x.astype(np.float64).std(0)
    module = _bn()
    y, _ = run(module, init(module, x), x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, exact, atol=2e-3)


def _renorm(**kwargs):
    return jn.BatchRenorm(use_running_average=False, **kwargs)


def test_batch_renorm_with_unit_limits_is_batch_norm():
    x = _data((8, 2, 3))
    variables = _randomized(shapes(_bn(), x))

    def loss(module, params, inputs):
        y, state = module.apply(
            {**variables, "params": params}, inputs, mutable=["batch_stats"]
        )
        return jnp.sum(y * jnp.arange(3.0)), (y, state)

    gradient = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)
    renorm = gradient(_renorm(r_max=1.0, d_max=0.0), variables["params"], x)
    plain = gradient(_bn(), variables["params"], x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 renorm, plain)


def test_batch_renorm_applies_clipped_corrections_from_running_statistics():
    x = _data((16, 3))
    variables = _randomized(shapes(_bn(), x))
    stats, params = variables["batch_stats"], variables["params"]
    r_max, d_max = 1.5, 0.5
    y, updated = run(
        _renorm(r_max=r_max, d_max=d_max), variables, x, mutable=["batch_stats"]
    )
    batch_std = np.sqrt(x.var(0) + 1e-5)
    running_std = np.sqrt(stats["var"] + 1e-5)
    r = np.clip(batch_std / running_std, 1 / r_max, r_max)
    d = np.clip((x.mean(0) - stats["mean"]) / running_std, -d_max, d_max)
    expected = ((x - x.mean(0)) / batch_std * r + d) * params["scale"] + params["bias"]
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert np.any(r == r_max) or np.any(r == 1 / r_max)  # the clipping is exercised
    _, plain = run(_bn(), variables, x, mutable=["batch_stats"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updated, plain)


def test_batch_renorm_corrections_carry_no_gradient():
    """With r, d constant, dy/dx is BatchNorm's times r per channel."""
    x = _data((16, 3))
    variables = _randomized(shapes(jn.BatchNorm(), x, use_running_average=True))
    variables = {**variables, "batch_stats": {"mean": jnp.zeros(3), "var": jnp.full(3, 4.0)}}
    weights = _data((16, 3), seed=3)

    def gradient(module):
        return jax.jit(jax.grad(
            lambda v: jnp.sum(module.apply(variables, v, mutable=["batch_stats"])[0] * weights)
        ))(x)

    r = np.clip(np.sqrt(x.var(0) + 1e-5) / np.sqrt(4.0 + 1e-5), 1 / 3.0, 3.0)
    np.testing.assert_allclose(gradient(_renorm()), gradient(_bn()) * r, rtol=1e-4, atol=1e-5)


def test_group_norm_feature_axis_one_serves_nchw():
    x = _data((2, 6, 3, 3))
    nchw, nhwc = jn.GroupNorm(num_groups=3, feature_axis=1), jn.GroupNorm(num_groups=3)
    variables = _randomized(shapes(nhwc, x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(
        run(nchw, variables, x).transpose(0, 2, 3, 1),
        run(nhwc, variables, x.transpose(0, 2, 3, 1)),
        rtol=1e-5, atol=1e-5,
    )


def test_group_norm_with_one_group_equals_layer_norm_over_all_but_batch():
    x = _data((2, 3, 4))
    group = run(jn.GroupNorm(num_groups=1, use_scale=False, use_bias=False), {}, x)
    layer = run(jn.LayerNorm(reduction_axes=(1, 2), use_scale=False, use_bias=False), {}, x)
    np.testing.assert_allclose(group, layer, rtol=1e-5, atol=1e-5)


def test_conditional_instance_norm_selects_and_mixes_style_parameters():
    x = _data((3, 4, 4, 2))
    module = jn.ConditionalInstanceNorm(num_styles=3)
    variables = _randomized(shapes(module, x, 0))
    scale, bias = variables["params"]["scale"], variables["params"]["bias"]
    assert scale.shape == bias.shape == (3, 2)
    normalized = (x - x.mean((1, 2), keepdims=True)) / np.sqrt(
        x.var((1, 2), keepdims=True) + 1e-6
    )
    apply = jax.jit(module.apply)
    ids = np.array([2, 0, 2])
    by_id = apply(variables, x, ids)
    np.testing.assert_allclose(
        by_id, normalized * scale[ids][:, None, None] + bias[ids][:, None, None], rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        apply(variables, x, np.eye(3, dtype=np.float32)[ids]), by_id, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        apply(variables, x, np.int32(1)), normalized * scale[1] + bias[1], rtol=1e-5, atol=1e-5
    )
    mix = np.array([[0.5, 0.5, 0.0]] * 3, np.float32)
    np.testing.assert_allclose(
        apply(variables, x, mix),
        normalized * (scale[0] + scale[1]) / 2 + (bias[0] + bias[1]) / 2,
        rtol=1e-5, atol=1e-5,
    )
    with pytest.raises(ValueError, match="style ids"):
        module.apply(variables, x, 3)


def test_parameter_free_modules_equal_the_functional_core():
    content, style = _data((2, 5, 5, 3)), _data((2, 4, 4, 3), seed=2, loc=-1.0)
    np.testing.assert_allclose(
        run(jn.AdaptiveInstanceNorm(), {}, content, style),
        jax.jit(jaxnorm.adaptive_instance_norm)(content, style),
    )
    np.testing.assert_allclose(
        run(jn.LocalResponseNorm(size=3, feature_axis=1), {}, content),
        jax.jit(functools.partial(jaxnorm.local_response_norm, size=3, feature_axis=1))(content),
    )


def test_half_precision_input_normalizes_with_float32_statistics():
    x = _data((32, 4), loc=100.0, spread=1.0)
    half = jnp.asarray(x, jnp.bfloat16)
    exact = (np.asarray(half, np.float64) - np.asarray(half, np.float64).mean(0)) / np.asarray(
        half, np.float64
    ).std(0)
    for module in (_bn(dtype=jnp.bfloat16), jn.BatchNorm(use_running_average=False)):
        variables = init(module, half)
        y, updated = run(module, variables, half, mutable=["batch_stats"])
        flax_module = fnn.BatchNorm(use_running_average=False, dtype=module.dtype)
        assert y.dtype == run(flax_module, variables, half, mutable=["batch_stats"])[0].dtype
        assert updated["batch_stats"]["var"].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y, np.float64), exact, atol=4e-2)


def test_mutable_true_returns_exactly_flax_collections():
    x = _data((6, 4))
    variables = _randomized(shapes(_bn(), x))
    _, ours = run(_bn(), variables, x, mutable=True)
    _, theirs = run(fnn.BatchNorm(use_running_average=False), variables, x, mutable=True)
    assert _signature(ours) == _signature(theirs)


FAST_VARIANCE_PAIRS = [
    (jn.BatchNorm, fnn.BatchNorm, {"use_running_average": False}, (64, 16)),
    (jn.LayerNorm, fnn.LayerNorm, {}, (64, 16)),
    (jn.InstanceNorm, fnn.InstanceNorm, {}, (8, 8, 16)),
    (jn.GroupNorm, fnn.GroupNorm, {"num_groups": 4}, (4, 8, 16)),
]


@pytest.mark.parametrize("ours, theirs, kwargs, shape", FAST_VARIANCE_PAIRS)
def test_use_fast_variance_selects_flax_one_pass_formula(ours, theirs, kwargs, shape):
    # At mean/std = 1e4 the one-pass E[x²] − E[x]² cancels in float32: with True both
    # libraries give the same (wrong) output; by default ours is exact and Flax's is not.
    x = _data(shape, loc=1e4, spread=1.0)
    variables = init(theirs(**kwargs), x)

    def run(module):
        return module.apply(variables, x, mutable=["batch_stats"])[0]

    fast_ours = run(ours(use_fast_variance=True, **kwargs))
    np.testing.assert_allclose(
        fast_ours, run(theirs(use_fast_variance=True, **kwargs)), rtol=1e-6, atol=1e-6
    )
    assert float(np.std(fast_ours)) > 10  # the cancellation is really there
    stable = run(ours(**kwargs))
    np.testing.assert_allclose(float(np.std(stable)), 1.0, atol=1e-3)
