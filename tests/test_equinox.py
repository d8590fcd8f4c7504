"""jaxnorm.equinox against equinox.nn (issue 21).

* our own versions of Equinox's normalization test cases, run on both libraries and
  compared (outputs and state to float32 round-off), with the documented differences
  asserted explicitly: BatchNorm's ``mode="ema"`` training output after the first step,
  the bias-corrected inference variance of ``mode="batch"``, an untrained ``ema`` layer;
* checkpoints (``eqx.tree_serialise_leaves``) load across the libraries, both ways;
* each Equinox complaint of the issue, fixed, with a test: static ``axis_name``, one
  count-weighted collective, the unbiased option, ``mode="batch"`` by default, nested
  ``vmap``, any number of spatial axes, a stable variance;
* every layer under ``jit``, ``grad``, ``vmap``, ``eqx.filter_jit``/``eqx.filter_grad``;
* the new layers (InstanceNorm with running statistics, LRN, AdaIN, CIN, BatchRenorm,
  ghost batch norm) against the functional core;
* a small ResNet on the digits trained with both libraries to the same accuracy.
"""

from __future__ import annotations

import collections
import io
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

eqx = pytest.importorskip("equinox")

import jaxnorm  # noqa: E402
import jaxnorm.equinox as jeq  # noqa: E402

KEY = jax.random.key(0)
ATOL = 2e-6


@pytest.fixture(autouse=True, scope="module")
def _cheap_compiles():
    """Compile without XLA's optimizations (these tests check values, not speed): the
    module's many small programs compile several times faster; restored afterwards."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def normal(shape: tuple[int, ...], seed: int = 0, loc: float = 0.0,
           scale: float = 1.0) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(loc, scale, size=shape), jnp.float32)


@eqx.filter_jit
def _mapped(layer, x, state, axis_name):
    return jax.vmap(layer, in_axes=(0, None), out_axes=(0, None), axis_name=axis_name)(
        x, state)


def batched(layer, axis_name="batch"):
    """``layer`` mapped over a batch, the state shared: Equinox's usage. Compiled once per
    layer structure (an unoptimized compile costs less than running the normalization op
    by op), the layer an argument, so repeated steps reuse the compile."""
    return lambda x, state: _mapped(layer, x, state, axis_name)


def close(a, b, atol: float = ATOL) -> None:
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               atol=atol, rtol=atol)


def same_trees(a, b, atol: float = ATOL) -> None:
    """The same leaves in the same order: shape, dtype and values to ``atol`` (the
    libraries' classes and state keys differ, so not the tree structure itself)."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert jnp.shape(x) == jnp.shape(y) and jnp.result_type(x) == jnp.result_type(y)
        if np.isfinite(atol):  # atol=inf: the layout only
            close(x, y, atol)


def both(name: str, *args, **kwargs):
    """``(equinox layer, jaxnorm layer)`` built with the same arguments."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(eqx.nn, name)(*args, **kwargs), getattr(jeq, name)(*args, **kwargs)


def both_with_state(name: str, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (eqx.nn.make_with_state(getattr(eqx.nn, name))(*args, **kwargs),
                eqx.nn.make_with_state(getattr(jeq, name))(*args, **kwargs))


# --- Equinox's test cases, on both libraries --------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (5, 6), (3, 4, 5)])
@pytest.mark.parametrize(("use_weight", "use_bias"), [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_layer_and_rms_norm_match_equinox(name, shape, use_weight, use_bias) -> None:
    theirs, ours = both(name, shape, use_weight=use_weight, use_bias=use_bias)
    theirs = eqx.tree_at(lambda m: (m.weight, m.bias), theirs,
                         (normal(shape, 1) if use_weight else None,
                          normal(shape, 2) if use_bias else None),
                         is_leaf=lambda v: v is None)
    ours = eqx.tree_at(lambda m: (m.weight, m.bias), ours, (theirs.weight, theirs.bias),
                       is_leaf=lambda v: v is None)
    same_trees(eqx.filter(theirs, eqx.is_array), eqx.filter(ours, eqx.is_array))
    x = normal(shape, 3, loc=2.0, scale=3.0)
    close(ours(x), theirs(x))
    state = object()  # passed through untouched, as Equinox's
    y, passed = ours(x, state)
    assert passed is state
    close(y, theirs(x))


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_layer_norms_keep_input_dtype_and_reject_other_shapes(name) -> None:
    theirs, ours = both(name, (4, 3))
    x = normal((4, 3), 4).astype(jnp.bfloat16)
    assert ours(x).dtype == theirs(x).dtype == jnp.bfloat16
    close(ours(x).astype(jnp.float32), theirs(x).astype(jnp.float32), atol=1e-2)
    for bad in (normal((2, 4, 3)), normal((3, 4))):
        with pytest.raises(ValueError, match="vmap"):
            ours(bad)
    close(jax.vmap(ours)(normal((2, 4, 3))), jax.vmap(theirs)(normal((2, 4, 3))))


def test_layer_norm_deprecated_elementwise_affine_and_default_bias() -> None:
    with pytest.warns(DeprecationWarning):
        norm = jeq.LayerNorm(3, elementwise_affine=False)
    assert norm.weight is None and norm.bias is None
    assert jeq.RMSNorm(3).bias is not None  # as Equinox: RMSNorm learns a bias by default


@pytest.mark.parametrize(("groups", "shape"), [(1, (4,)), (2, (4, 5)), (4, (4, 3, 2)),
                                               (2, (6, 2, 3, 2))])
def test_group_norm_matches_equinox(groups, shape) -> None:
    theirs, ours = both("GroupNorm", groups, shape[0])
    theirs = eqx.tree_at(lambda m: (m.weight, m.bias), theirs,
                         (normal(shape[:1], 1), normal(shape[:1], 2)))
    ours = eqx.tree_at(lambda m: (m.weight, m.bias), ours, (theirs.weight, theirs.bias))
    x = normal(shape, 5, loc=-1.0, scale=2.0)
    close(ours(x), theirs(x))
    plain_theirs, plain_ours = both("GroupNorm", groups, None, channelwise_affine=False)
    close(plain_ours(x), plain_theirs(x))


def test_group_norm_errors() -> None:
    with pytest.raises(ValueError, match="divide"):
        jeq.GroupNorm(3, 4)
    with pytest.raises(ValueError, match="channels"):
        jeq.GroupNorm(2)
    with pytest.raises(ValueError, match="divide"):
        jeq.GroupNorm(3, channelwise_affine=False)(normal((4, 2)))


@pytest.mark.parametrize("spatial", [(), (5,), (3, 4), (2, 3, 2)])
def test_batch_norm_batch_mode_matches_equinox_in_training(spatial) -> None:
    (theirs, state_theirs), (ours, state_ours) = both_with_state(
        "BatchNorm", 3, "batch", mode="batch")
    same_trees(state_theirs, state_ours)
    for step in range(3):
        x = normal((6, 3, *spatial), step, loc=step, scale=1 + step)
        y_theirs, state_theirs = batched(theirs)(x, state_theirs)
        y_ours, state_ours = batched(ours)(x, state_ours)
        close(y_ours, y_theirs, 5e-6)
        same_trees(state_ours, state_theirs)
    counter = state_ours.get(ours.batch_counter)
    assert int(counter) == 3


def test_batch_norm_inference_is_bias_corrected_equinox_is_not() -> None:
    """Documented difference: Equinox divides the running variance, initial 1 included, by
    1 - m^k (after one batch: 99 + var for m = 0.99); we remove the initial 1 first."""
    (theirs, state_theirs), (ours, state_ours) = both_with_state(
        "BatchNorm", 1, "batch", mode="batch")
    x = jnp.array([[0.0], [2.0]])  # mean 1, biased variance 1
    _, state_theirs = batched(theirs)(x, state_theirs)
    _, state_ours = batched(ours)(x, state_ours)
    same_trees(state_ours, state_theirs)
    running = ours.running_statistics(state_ours)
    close(running.mean, [1.0], 1e-5)
    close(running.var, [1.0], 1e-4)
    y_ours, _ = batched(eqx.nn.inference_mode(ours))(x, state_ours)
    y_theirs, _ = batched(eqx.nn.inference_mode(theirs))(x, state_theirs)
    close(y_ours, [[-1.0], [1.0]], 1e-3)  # (x - 1)/sqrt(1 + eps)
    close(y_theirs, [[-0.1], [0.1]], 1e-5)  # Equinox: (x - 1)/sqrt(100)
    # before any batch both normalize with (0, 1)
    fresh_theirs, fresh_ours = both_with_state("BatchNorm", 1, "batch", mode="batch")
    close(batched(eqx.nn.inference_mode(fresh_ours[0]))(x, fresh_ours[1])[0],
          batched(eqx.nn.inference_mode(fresh_theirs[0]))(x, fresh_theirs[1])[0])


def test_batch_norm_bias_correction_is_the_weighted_average_of_batch_statistics() -> None:
    (ours, state), momentum = eqx.nn.make_with_state(jeq.BatchNorm)(2, "b", momentum=0.9), 0.9
    means, variances = [], []
    for step in range(4):
        x = normal((8, 2, 3), step, loc=step, scale=1 + step)
        _, state = batched(ours, "b")(x, state)
        means.append(np.mean(np.asarray(x), axis=(0, 2)))
        variances.append(np.var(np.asarray(x), axis=(0, 2)))
    weights = (1 - momentum) * momentum ** np.arange(3, -1, -1)
    weights /= weights.sum()
    running = ours.running_statistics(state)
    close(running.mean, weights @ np.array(means), 1e-5)
    close(running.var, weights @ np.array(variances), 1e-4)


def test_batch_norm_ema_mode_state_matches_training_output_differs_after_first_step() -> None:
    """Documented difference: in ``mode="ema"`` Equinox normalizes training batches with
    the running averages once it has seen a batch; we use the batch statistics. The first
    step (Equinox fills the averages with the batch's) and the state agree throughout."""
    (theirs, state_theirs), (ours, state_ours) = both_with_state(
        "BatchNorm", 3, "batch", mode="ema")
    same_trees(state_theirs, state_ours, atol=np.inf)  # layout (Equinox's are uninitialised)
    for step in range(3):
        x = normal((8, 3, 4), 10 + step, loc=2 * step, scale=1 + step)
        y_theirs, state_theirs = batched(theirs)(x, state_theirs)
        y_ours, state_ours = batched(ours)(x, state_ours)
        same_trees(state_ours, state_theirs, 1e-5)
        batch_y = jnp.moveaxis(jaxnorm.batch_norm(jnp.moveaxis(x, 1, -1), eps=1e-5)[0], -1, 1)
        close(y_ours, batch_y, 5e-5)
        if step == 0:
            close(y_theirs, y_ours, 5e-6)
        else:
            assert not np.allclose(y_theirs, y_ours, atol=1e-2)
    y_ours, _ = batched(eqx.nn.inference_mode(ours))(x, state_ours)
    y_theirs, _ = batched(eqx.nn.inference_mode(theirs))(x, state_theirs)
    close(y_ours, y_theirs, 5e-6)


def test_untrained_ema_layer_normalizes_with_zero_mean_unit_variance() -> None:
    ours, state = eqx.nn.make_with_state(jeq.BatchNorm)(2, "batch", mode="ema")
    x = normal((4, 2, 3), 0)
    y, _ = batched(lambda x, s: ours(x, s, inference=True))(x, state)
    close(y, x / np.sqrt(1 + 1e-5))


def test_legacy_mode_is_ema_layout() -> None:
    assert jeq.BatchNorm(2, "b", mode="legacy").mode == "ema"
    with pytest.raises(ValueError, match="mode"):
        jeq.BatchNorm(2, "b", mode="running")


def test_batch_norm_without_affine_and_in_float64_dtype_argument() -> None:
    (theirs, st), (ours, so) = both_with_state("BatchNorm", 2, "batch",
                                               channelwise_affine=False, mode="batch")
    assert ours.weight is None and ours.bias is None
    x = normal((5, 2, 3))
    close(batched(ours)(x, so)[0], batched(theirs)(x, st)[0], 5e-6)
    ours16, state16 = eqx.nn.make_with_state(jeq.BatchNorm)(2, "batch", dtype=jnp.float16)
    assert ours16.weight.dtype == jnp.float16
    _, state16 = batched(ours16)(x, state16)  # the state keeps its dtype
    assert all(v.dtype == jnp.float16 for v in jax.tree.leaves(state16)[1:])


def test_spectral_norm_matches_equinox() -> None:
    for layer in (eqx.nn.Linear(5, 4, key=KEY), eqx.nn.Conv2d(3, 4, 3, key=KEY)):
        (theirs, st), (ours, so) = both_with_state("SpectralNorm", layer, "weight",
                                                   num_power_iterations=2,
                                                   key=jax.random.key(1))
        same_trees(so, st, 1e-5)
        x = normal((5,) if isinstance(layer, eqx.nn.Linear) else (3, 6, 6), 2)
        for _ in range(2):
            y_theirs, st = theirs(x, st)
            y_ours, so = ours(x, so)
            close(y_ours, y_theirs, 1e-5)
            same_trees(so, st, 1e-5)
        frozen, unchanged = eqx.nn.inference_mode(ours)(x, so)
        close(frozen, y_ours, 1e-5)
        same_trees(unchanged, so, 0)


def test_spectral_norm_divides_by_the_top_singular_value() -> None:
    layer = eqx.nn.Linear(6, 4, key=KEY)
    ours, state = eqx.nn.make_with_state(jeq.SpectralNorm)(layer, "weight", key=KEY)
    x = jnp.eye(6)
    for _ in range(3):
        y, state = jax.vmap(ours, in_axes=(0, None), out_axes=(0, None))(x, state)
    weight = (y - layer.bias).T  # columns: the normalized weight times e_i
    close(np.linalg.svd(np.asarray(weight), compute_uv=False)[0], 1.0, 1e-4)
    with pytest.raises(ValueError, match="2-d"):
        jeq.SpectralNorm(eqx.nn.Linear(3, 4, key=KEY), "bias", key=KEY)


def _scaled_weight(layer, scale: float):
    return eqx.tree_at(lambda m: (m.weight, m.bias), layer,
                       (layer.weight * scale, jnp.zeros_like(layer.bias)))


def test_spectral_and_weight_norm_are_scale_invariant_as_equinox() -> None:
    """Small weights (spectral norm ~1e-6): Equinox floors the norms at eps
    (max(norm, eps)), exact down to 1e-12; an eps added to the squared norm distorts
    the normalized weight once the squared norm nears 1e-12 (scale 1e-5: 2e-2 off)."""
    x = normal((6,), 2)
    for scale in (1e-5, 1e-6):
        layer = _scaled_weight(eqx.nn.Linear(6, 4, key=KEY), scale)
        (theirs, st), (ours, so) = both_with_state("SpectralNorm", layer, "weight",
                                                   key=jax.random.key(1))
        y_theirs, _ = theirs(x, st)
        y_ours, so = ours(x, so)
        close(y_ours, y_theirs, 1e-5)
        weight = jax.vmap(ours, in_axes=(0, None), out_axes=(0, None))(jnp.eye(6), so)[0].T
        close(np.linalg.svd(np.asarray(weight), compute_uv=False)[0], 1.0, 1e-4)
        for axis in (0, None):
            theirs_wn, ours_wn = both("WeightNorm", layer, axis=axis)
            scaled = lambda m: eqx.tree_at(lambda m: m.g, m, m.g / scale)  # noqa: E731
            close(scaled(ours_wn)(x), scaled(theirs_wn)(x), 1e-5)
    zero = eqx.tree_at(lambda m: m.weight, eqx.nn.Linear(3, 2, key=KEY), jnp.zeros((2, 3)))
    grads = eqx.filter_grad(lambda m: jnp.sum(m(jnp.ones(3))))(jeq.WeightNorm(zero))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("axis", [0, None, 1])
def test_weight_norm_matches_equinox(axis) -> None:
    for layer in (eqx.nn.Linear(5, 4, key=KEY), eqx.nn.Conv1d(3, 4, 3, key=KEY)):
        theirs, ours = both("WeightNorm", layer, axis=axis)
        close(ours.g, theirs.g)
        x = normal((5,) if isinstance(layer, eqx.nn.Linear) else (3, 7), 3)
        close(ours(x), theirs(x), 1e-5)
        g = theirs.g * 2.5
        close(eqx.tree_at(lambda m: m.g, ours, g)(x), eqx.tree_at(lambda m: m.g, theirs, g)(x),
              1e-5)


# --- checkpoints load across the libraries --------------------------------------------


class Net(eqx.Module):
    """A model with every drop-in layer, built from either library's ``nn``."""

    conv: eqx.Module
    batch: eqx.Module
    group: eqx.Module
    layer: eqx.Module
    rms: eqx.Module
    head: eqx.Module

    def __init__(self, nn, key, mode="batch"):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv = nn.SpectralNorm(eqx.nn.Conv2d(1, 4, 3, padding=1, key=k1), "weight", key=k2)
        self.batch = nn.BatchNorm(4, "batch", mode=mode)
        self.group = nn.GroupNorm(2, 4)
        self.layer = nn.LayerNorm((4, 5, 5))
        self.rms = nn.RMSNorm(4)
        self.head = nn.WeightNorm(eqx.nn.Linear(4, 3, key=k3))

    def __call__(self, x, state):
        x, state = self.conv(x, state)
        x, state = self.batch(x, state)
        x = self.layer(self.group(x))
        return self.head(self.rms(jnp.mean(x, axis=(1, 2)))), state


def build(nn, mode="batch"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return eqx.nn.make_with_state(Net)(nn, KEY, mode)


def serialised(tree) -> io.BytesIO:
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, tree)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_checkpoints_load_across_libraries_both_ways(mode) -> None:
    model_theirs, state_theirs = build(eqx.nn, mode)
    model_ours, state_ours = build(jeq, mode)
    x = normal((6, 1, 5, 5), 7)
    step = eqx.filter_jit(lambda m, s, x: batched(m)(x, s))
    for _ in range(2):  # move weights and state away from their initial values
        _, state_theirs = step(model_theirs, state_theirs, x)
    model_theirs = jax.tree.map(lambda v: v * 1.5 if eqx.is_inexact_array(v) else v,
                                model_theirs)
    loaded = eqx.tree_deserialise_leaves(serialised(model_theirs), model_ours)
    loaded_state = eqx.tree_deserialise_leaves(serialised(state_theirs), state_ours)
    same_trees(eqx.filter(loaded, eqx.is_array), eqx.filter(model_theirs, eqx.is_array), 0)
    same_trees(loaded_state, state_theirs, 0)
    y_ours, _ = step(eqx.nn.inference_mode(loaded), loaded_state, x)
    if mode == "ema":  # the running averages are used as stored: the same outputs
        y_theirs, _ = step(eqx.nn.inference_mode(model_theirs), state_theirs, x)
        close(y_ours, y_theirs, 1e-4)
    back = eqx.tree_deserialise_leaves(serialised(loaded), build(eqx.nn, mode)[0])
    back_state = eqx.tree_deserialise_leaves(serialised(loaded_state), build(eqx.nn, mode)[1])
    same_trees(eqx.filter(back, eqx.is_array), eqx.filter(model_theirs, eqx.is_array), 0)
    same_trees(back_state, state_theirs, 0)


# --- Equinox's complaints, fixed ------------------------------------------------------


def test_axis_name_is_static_not_a_leaf() -> None:
    theirs, ours = both("BatchNorm", 3, ["batch", "x"], mode="batch")
    assert "batch" in jax.tree.leaves(theirs)  # Equinox: a string leaf
    assert all(eqx.is_array(v) or isinstance(v, bool) for v in jax.tree.leaves(ours))
    assert ours.axis_name == ("batch", "x")  # a list becomes a hashable tuple
    placed = jax.device_put(eqx.filter(ours, eqx.is_array), jax.devices()[0])
    assert jax.tree.structure(placed) == jax.tree.structure(eqx.filter(ours, eqx.is_array))
    jax.device_put(jeq.BatchNorm(3, "batch"), jax.devices()[0])  # whole layer: no str leaf
    with pytest.raises(TypeError):
        jax.device_put(theirs, jax.devices()[0])


COLLECTIVES = {"psum", "pmax", "pmin", "all_gather", "all_to_all", "ppermute",
               "psum_scatter", "reduce_scatter", "psum_invariant"}


def collectives(jaxpr) -> collections.Counter:
    """The collective primitives of ``jaxpr`` and its sub-jaxprs."""
    found: collections.Counter = collections.Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in COLLECTIVES:
            found[eqn.primitive.name] += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += collectives(inner)
    return found


def test_batch_statistics_in_one_collective_equinox_uses_two() -> None:
    (theirs, st), (ours, so) = both_with_state("BatchNorm", 3, "batch", mode="batch")
    x = normal((3, 4, 4))

    def count(layer, state):
        jaxpr = jax.make_jaxpr(lambda x: layer(x, state)[0], axis_env=[("batch", 8)])(x)
        return sum(collectives(jaxpr.jaxpr).values())

    assert count(ours, so) == 1
    assert count(theirs, st) == 2  # a pmean of the means, then one of the variances


def test_masked_members_are_weighted_by_their_counts() -> None:
    ours, state = eqx.nn.make_with_state(jeq.BatchNorm)(2, "batch", momentum=0.0)
    x = normal((4, 2, 6), 3, loc=5.0)
    mask = jnp.arange(6)[None, None, :] < jnp.array([1, 2, 5, 6])[:, None, None]
    mask = jnp.broadcast_to(mask, x.shape)
    y, state = eqx.filter_jit(jax.vmap(lambda x, m: ours(x, state, mask=m),
                                       out_axes=(0, None), axis_name="batch"))(x, mask)
    counted = [np.asarray(x)[:, c][np.asarray(mask)[:, c]] for c in range(2)]
    mean = np.array([v.mean() for v in counted])  # over the counted elements only
    var = np.array([v.var() for v in counted])
    close(state.get(ours.batch_state_index)[0], mean, 1e-5)
    close(state.get(ours.batch_state_index)[1], var, 1e-5)
    close(y, (x - mean[:, None]) / np.sqrt(var[:, None] + 1e-5), 1e-5)


def test_unbiased_running_variance_option_is_what_it_says() -> None:
    ours, state = eqx.nn.make_with_state(jeq.BatchNorm)(
        2, "batch", momentum=0.0, unbiased_running_var=True)
    x = normal((5, 2, 3), 4)
    _, state = batched(ours)(x, state)
    unbiased = np.var(np.moveaxis(np.asarray(x), 1, 0).reshape(2, -1), axis=1, ddof=1)
    close(ours.running_statistics(state).var, unbiased, 1e-5)
    (theirs, st), (biased, sb) = both_with_state("BatchNorm", 2, "batch", momentum=0.0,
                                                 mode="batch")
    _, st = batched(theirs)(x, st)
    _, sb = batched(biased)(x, sb)
    biased_var = unbiased * 14 / 15
    close(st.get(theirs.batch_state_index)[1], biased_var, 1e-5)  # Equinox: biased
    close(biased.running_statistics(sb).var, biased_var, 1e-5)  # ours by default, too


def test_batch_mode_is_the_default_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jeq.BatchNorm(3, "batch").mode == "batch"
    with pytest.warns(UserWarning, match="ema"):
        assert eqx.nn.BatchNorm(3, "batch").mode == "ema"  # Equinox's default: legacy ema


def test_nested_vmap_with_two_axis_names_is_one_batch() -> None:
    (theirs, st), (ours, so) = both_with_state("BatchNorm", 3, ("outer", "inner"),
                                               mode="batch")
    x = normal((2, 4, 3, 5), 6, loc=1.0)

    def nested(layer, state):
        inner = jax.vmap(layer, in_axes=(0, None), out_axes=(0, None), axis_name="inner")
        return jax.vmap(inner, in_axes=(0, None), out_axes=(0, None), axis_name="outer")(
            x, state)

    y_ours, so = nested(ours, so)
    y_theirs, st = nested(theirs, st)
    close(y_ours, y_theirs, 5e-6)
    same_trees(so, st)
    flat, _ = batched(eqx.nn.make_with_state(jeq.BatchNorm)(3, "batch")[0])(
        x.reshape(8, 3, 5), eqx.nn.make_with_state(jeq.BatchNorm)(3, "batch")[1])
    close(y_ours.reshape(8, 3, 5), flat, 5e-6)


def test_batch_norm_takes_any_number_of_spatial_axes() -> None:
    for spatial in [(), (2,), (2, 3), (2, 1, 3), (1, 2, 1, 2)]:
        ours, state = eqx.nn.make_with_state(jeq.BatchNorm)(3, "batch")
        x = normal((4, 3, *spatial), len(spatial))
        y, state = batched(ours)(x, state)
        reference = jaxnorm.batch_norm(x, axis=1, eps=1e-5)[0]
        close(y, reference, 5e-6)


def test_stable_variance_far_from_zero() -> None:
    """Mean/std = 1e4 in float32: no E[x^2] - E[x]^2 cancellation, at the first step
    (no running mean to shift by yet) and later."""
    ours, state = eqx.nn.make_with_state(jeq.BatchNorm)(2, "batch", momentum=0.0)
    x = normal((16, 2, 8), 8, loc=1e4, scale=1.0)
    for _ in range(2):
        y, state = batched(ours)(x, state)
        exact = np.var(np.moveaxis(np.asarray(x, np.float64), 1, 0).reshape(2, -1), axis=1)
        np.testing.assert_allclose(state.get(ours.batch_state_index)[1], exact, rtol=1e-3)
        np.testing.assert_allclose(np.std(np.asarray(y), axis=(0, 2)), 1.0, atol=1e-3)


def test_axis_name_required_at_call_as_equinox() -> None:
    ours, state = eqx.nn.make_with_state(jeq.BatchNorm)(3, "batch")
    with pytest.raises(NameError):
        ours(normal((3, 2)), state)
    with pytest.raises(ValueError, match="channels-first"):
        batched(ours)(normal((4, 2, 3)), state)


# --- the new layers -------------------------------------------------------------------


def test_instance_norm_matches_the_core_and_tracks_running_stats() -> None:
    x = normal((4, 3, 5, 2), 9, loc=1.0, scale=2.0)
    reference = jaxnorm.instance_norm(jnp.moveaxis(x, 1, -1), eps=1e-5)
    close(jax.vmap(jeq.InstanceNorm(3))(x), jnp.moveaxis(reference, -1, 1), 5e-6)
    norm, state = eqx.nn.make_with_state(jeq.InstanceNorm)(
        3, track_running_stats=True, axis_name="batch", momentum=0.0)
    assert norm.is_stateful() and not jeq.InstanceNorm(3).is_stateful()
    y, state = batched(norm)(x, state)
    close(y, jnp.moveaxis(reference, -1, 1), 5e-6)
    xs = np.asarray(x).reshape(4, 3, -1)
    mean, var = state.get(norm.state_index)
    close(mean, xs.mean(axis=(0, 2)), 1e-5)
    close(var, xs.var(axis=2).mean(axis=0), 1e-5)  # the instances' variances averaged
    y_eval, _ = batched(eqx.nn.inference_mode(norm))(x, state)
    close(y_eval, (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5), 1e-5)
    with pytest.raises(ValueError, match="state"):
        norm(x[0])


def test_instance_norm_matches_torch_running_stats() -> None:
    torch = pytest.importorskip("torch")
    x = normal((4, 3, 6), 11)
    norm, state = eqx.nn.make_with_state(jeq.InstanceNorm)(
        3, channelwise_affine=False, track_running_stats=True, axis_name="batch",
        momentum=0.9, unbiased_running_var=True)
    y, state = batched(norm)(x, state)
    module = torch.nn.InstanceNorm1d(3, momentum=0.1, track_running_stats=True)
    expected = module(torch.tensor(np.asarray(x))).detach().numpy()
    close(y, expected, 1e-5)
    close(state.get(norm.state_index)[0], module.running_mean.numpy(), 1e-6)
    close(state.get(norm.state_index)[1], module.running_var.numpy(), 1e-6)


def test_local_response_norm_adain_and_conditional_instance_norm() -> None:
    x = normal((2, 6, 4, 4), 12)
    lrn = jeq.LocalResponseNorm(3, alpha=0.1)
    close(jax.vmap(lrn)(x), jaxnorm.local_response_norm(x, size=3, alpha=0.1,
                                                        feature_axis=1))
    with pytest.raises(ValueError, match="size"):
        jeq.LocalResponseNorm(0)
    style = normal((2, 6, 3, 3), 13, loc=2.0, scale=3.0)
    y = jax.vmap(jeq.AdaptiveInstanceNorm())(x, style)
    close(y.mean(axis=(2, 3)), style.mean(axis=(2, 3)), 1e-5)
    close(y.std(axis=(2, 3)), style.std(axis=(2, 3)), 1e-3)
    cin = jeq.ConditionalInstanceNorm(3, 6)
    cin = eqx.tree_at(lambda m: (m.weight, m.bias), cin, (normal((3, 6), 1), normal((3, 6), 2)))
    ids = jnp.array([2, 0])
    moved = jnp.moveaxis(x, 1, -1)
    expected = jaxnorm.conditional_instance_norm(moved, ids, cin.weight, cin.bias, eps=1e-5)
    close(jax.vmap(cin)(x, ids), jnp.moveaxis(expected, -1, 1), 5e-6)
    mix = jnp.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    close(jax.vmap(cin)(x, mix), jnp.moveaxis(expected, -1, 1), 5e-6)


def test_batch_renorm_is_batch_norm_at_unit_limits_and_shares_its_state() -> None:
    x = normal((8, 3, 4), 14, loc=3.0)
    plain, plain_state = eqx.nn.make_with_state(jeq.BatchNorm)(3, "batch")
    renorm, renorm_state = eqx.nn.make_with_state(jeq.BatchRenorm)(3, "batch", r_max=1.0,
                                                                   d_max=0.0)
    same_trees(renorm_state, plain_state, 0)
    for _ in range(2):
        y_plain, plain_state = batched(plain)(x, plain_state)
        y_renorm, renorm_state = batched(renorm)(x, renorm_state)
        close(y_renorm, y_plain, 5e-6)
    same_trees(renorm_state, plain_state)
    # with room, the output is corrected towards the running statistics' normalization
    wide, state = eqx.nn.make_with_state(jeq.BatchRenorm)(
        3, "batch", r_max=lambda k: 1.0 + 2.0 * (k > 0), d_max=5.0)
    _, state = batched(wide)(x, state)
    y, _ = batched(wide)(x + 1.0, state)
    running = wide.running_statistics(state)
    mean = np.asarray(x + 1.0).mean(axis=(0, 2))
    std = np.sqrt(np.asarray(x).var(axis=(0, 2)) + 1e-5)
    r = std / np.sqrt(np.asarray(running.var) + 1e-5)
    d = (mean - np.asarray(running.mean)) / np.sqrt(np.asarray(running.var) + 1e-5)
    expected = (x + 1.0 - mean[:, None]) / std[:, None] * r[:, None] + d[:, None]
    close(y, expected, 1e-4)


def test_ghost_batch_norm_normalizes_each_group_and_pools_the_running_stats() -> None:
    x = normal((8, 3, 5), 15, loc=1.0)
    x = x + jnp.repeat(jnp.arange(2.0) * 4, 4)[:, None, None]  # the two groups differ
    ghost, state = eqx.nn.make_with_state(jeq.BatchNorm)(3, "batch", momentum=0.0,
                                                         virtual_batch_size=4)
    y, state = batched(ghost)(x, state)
    expected, _, _ = jaxnorm.batch_norm(jnp.moveaxis(x, 1, -1), eps=1e-5,
                                        virtual_batch_size=4)
    close(y, jnp.moveaxis(expected, -1, 1), 5e-6)
    groups = np.moveaxis(np.asarray(x), 1, 0).reshape(3, 2, -1)
    close(state.get(ghost.batch_state_index)[0], groups.mean(axis=(1, 2)), 1e-5)
    close(state.get(ghost.batch_state_index)[1], groups.var(axis=2).mean(axis=1), 1e-5)
    masked = jnp.ones_like(x, bool).at[:2].set(False)
    state = jax.tree.unflatten(*reversed(jax.tree.flatten(state)))  # a clone to reuse
    y_masked, _ = eqx.filter_jit(jax.vmap(
        lambda x, m: ghost(x, jax.tree.map(jnp.copy, state), mask=m), out_axes=(0, None),
        axis_name="batch"))(x, masked)
    first = np.asarray(x)[2:4]
    close(y_masked[2:4], (first - first.mean(axis=(0, 2))[:, None])
          / np.sqrt(first.var(axis=(0, 2))[:, None] + 1e-5), 1e-5)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        batched(ghost)(x[:6], state)


# --- transformations ------------------------------------------------------------------


def stateful_cases():
    return {
        "BatchNorm": (eqx.nn.make_with_state(jeq.BatchNorm)(3, "batch"), (3, 4)),
        "BatchRenorm": (eqx.nn.make_with_state(jeq.BatchRenorm)(3, "batch"), (3, 4)),
        "ghost": (eqx.nn.make_with_state(jeq.BatchNorm)(3, "batch", virtual_batch_size=2),
                  (3, 4)),
        "InstanceNorm": (eqx.nn.make_with_state(jeq.InstanceNorm)(
            3, track_running_stats=True, axis_name="batch"), (3, 4)),
        "SpectralNorm": (eqx.nn.make_with_state(jeq.SpectralNorm)(
            eqx.nn.Linear(4, 3, key=KEY), "weight", key=KEY), (4,)),
    }


def stateless_cases():
    return {
        "LayerNorm": (jeq.LayerNorm((3, 4)), (3, 4)),
        "RMSNorm": (jeq.RMSNorm((3, 4)), (3, 4)),
        "GroupNorm": (jeq.GroupNorm(3, 3), (3, 4)),
        "InstanceNorm": (jeq.InstanceNorm(3), (3, 4)),
        "LocalResponseNorm": (jeq.LocalResponseNorm(3), (3, 4)),
        "WeightNorm": (jeq.WeightNorm(eqx.nn.Linear(4, 3, key=KEY)), (4,)),
        "AdaptiveInstanceNorm": (lambda x: jeq.AdaptiveInstanceNorm()(x, x[:, ::-1] * 2),
                                 (3, 4)),
        "ConditionalInstanceNorm": (lambda x: jeq.ConditionalInstanceNorm(2, 3)(x, 1), (3, 4)),
    }


def test_every_stateful_layer_under_jit_grad_vmap_and_filter_transforms() -> None:
    x = normal((4, 3, 4), 16)
    for name, ((layer, state), shape) in stateful_cases().items():
        inputs = x if len(shape) == 2 else x[:, 0]

        def loss(layer, inputs, state):
            y, new_state = batched(layer)(inputs, state)
            return jnp.sum(jnp.sin(y)), new_state

        value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
        (value, new_state), grads = value_and_grad(layer, inputs, state)
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)), name
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        input_grad = jax.jit(lambda v, s: jax.grad(lambda v: loss(layer, v, s)[0])(v))(
            inputs, state)
        assert input_grad.shape == inputs.shape and np.isfinite(input_grad).all(), name


def test_every_stateless_layer_under_jit_grad_vmap_and_filter_transforms() -> None:
    x = normal((4, 3, 4), 17)
    for name, (layer, shape) in stateless_cases().items():
        inputs = x if len(shape) == 2 else x[:, 0]
        value, grad = jax.jit(jax.value_and_grad(
            lambda v: jnp.sum(jnp.sin(jax.vmap(layer)(v)))))(inputs)
        assert np.isfinite(grad).all() and grad.shape == inputs.shape, name
        if isinstance(layer, eqx.Module):
            filtered_value, grads = eqx.filter_jit(eqx.filter_value_and_grad(
                lambda m: jnp.sum(jnp.sin(jax.vmap(m)(inputs)))))(layer)
            close(filtered_value, value, 1e-5)
            assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)), name


def test_batch_norm_gradient_matches_equinox() -> None:
    (theirs, st), (ours, so) = both_with_state("BatchNorm", 3, "batch", mode="batch")
    x = normal((6, 3, 4), 18, loc=1.0)

    def loss(layer, state, x):
        return jnp.sum(jnp.sin(batched(layer)(x, state)[0]))

    g_theirs = eqx.filter_grad(loss)(theirs, st, x)
    g_ours = eqx.filter_grad(loss)(ours, so, x)
    close(g_ours.weight, g_theirs.weight, 1e-5)
    close(g_ours.bias, g_theirs.bias, 1e-5)
    close(jax.grad(loss, argnums=2)(ours, so, x), jax.grad(loss, argnums=2)(theirs, st, x),
          1e-5)


def test_layers_in_equinox_sequential() -> None:
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
        eqx.nn.Conv1d(2, 4, 3, key=KEY), jeq.BatchNorm(4, "batch"), jeq.GroupNorm(2, 4),
        jeq.InstanceNorm(4, track_running_stats=True, axis_name="batch"),
        eqx.nn.Lambda(jax.nn.relu)])
    y, state = batched(model)(normal((3, 2, 7), 19), state)
    assert y.shape == (3, 4, 5)
    assert len(jax.tree.leaves(state)) == 5  # counter, (mean, var); InstanceNorm's (mean, var)


# --- a small model on the digits, trained with both libraries -------------------------


@pytest.mark.slow
def test_digits_resnet_trains_to_the_same_accuracy_with_both_libraries() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import train_digits_equinox

    results = train_digits_equinox.main(["--quick"])
    by_library = {r["library"]: r for r in results}
    assert set(by_library) == {"equinox.nn", "jaxnorm.equinox"}
    accuracies = [r["test_accuracy"] for r in results]
    assert min(accuracies) > 0.9
    assert abs(accuracies[0] - accuracies[1]) <= 0.02


def test_stateless_layers_follow_equinox_optional_state_rule():
    # Equinox: y when no state is passed, (y, state) for any passed value, None included
    x = jnp.linspace(-1.0, 2.0, 12).reshape(4, 3)
    for ours, theirs in ((jeq.LayerNorm((4, 3)), eqx.nn.LayerNorm((4, 3))),
                         (jeq.RMSNorm((4, 3)), eqx.nn.RMSNorm((4, 3))),
                         (jeq.GroupNorm(2, 4), eqx.nn.GroupNorm(2, 4))):
        for args in ((), (None,)):
            mine, reference = ours(x, *args), theirs(x, *args)
            assert type(mine) is type(reference)
            np.testing.assert_allclose(np.asarray(jax.tree.leaves(mine)[0]),
                                       np.asarray(jax.tree.leaves(reference)[0]), atol=1e-6)
