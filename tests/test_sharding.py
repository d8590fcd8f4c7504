"""Sharded inputs under ``jit``: every layer on meshes with Explicit (``jax.make_mesh``'s
default) and Auto axes, sharded along the batch, a spatial or the feature axis, against
the unsharded computation and Flax (outputs, gradients, running statistics); the numerics
guarantees on sharded sets; synchronized statistics stable from the first step; and the
collectives each costs."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
import jaxnorm.linen
import jaxnorm.nnx

DEVICES = 8
pytestmark = pytest.mark.skipif(
    len(jax.devices()) < DEVICES,
    reason=f"needs {DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)",
)
AXIS_TYPES = [AxisType.Explicit, AxisType.Auto]
# float32 sums over at most 1024 elements of unit scale: round-off well below 1e-5
TOLERANCE = {"rtol": 2e-5, "atol": 2e-5}

# (name, module factory taking the library, spec of the (16, 8, 8, 16) input)
CASES = [
    ("batch_norm-batch", lambda lib: lib.BatchNorm(use_running_average=False), P("d")),
    ("batch_norm-spatial", lambda lib: lib.BatchNorm(use_running_average=False),
     P(None, "d")),
    ("group_norm-spatial", lambda lib: lib.GroupNorm(num_groups=4), P(None, "d")),
    ("group_norm-batch", lambda lib: lib.GroupNorm(num_groups=4), P("d")),
    ("instance_norm-spatial", lambda lib: lib.InstanceNorm(), P(None, None, "d")),
    ("instance_norm-batch", lambda lib: lib.InstanceNorm(), P("d")),
    ("layer_norm-batch", lambda lib: lib.LayerNorm(), P("d")),
    ("layer_norm-feature", lambda lib: lib.LayerNorm(), P(None, None, None, "d")),
    ("rms_norm-feature", lambda lib: lib.RMSNorm(), P(None, None, None, "d")),
]


def _mesh(axis_type):
    return jax.make_mesh((DEVICES,), ("d",), axis_types=(axis_type,))


def _data(offset=1.0, scale=2.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(offset, scale, (16, 8, 8, 16)).astype(np.float32)
    cotangent = rng.normal(size=x.shape).astype(np.float32)
    return x, cotangent


def _step(module):
    """Forward with the statistics update, and the gradients of <y, cotangent> with
    respect to the parameters and the input."""

    def step(variables, x, cotangent):
        def loss(params, x):
            y, updates = module.apply({**variables, "params": params}, x,
                                      mutable=["batch_stats"])
            return jnp.sum(y * cotangent), (y, updates)

        (_, (y, updates)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            variables.get("params", {}), x)
        return y, updates, grads

    return step


def _sharded(fn, axis_type, spec, *arrays):
    mesh = _mesh(axis_type)
    with jax.set_mesh(mesh):
        placed = [jax.device_put(a, jax.tree.map(lambda p: NamedSharding(mesh, p), s))
                  for a, s in zip(arrays, spec, strict=True)]
        return jax.device_get(jax.jit(fn)(*placed))


def _assert_trees_close(actual, desired, **tolerance):
    jax.tree.map(lambda a, d: np.testing.assert_allclose(np.asarray(a), np.asarray(d),
                                                         **tolerance), actual, desired)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("name,make,spec", CASES, ids=[c[0] for c in CASES])
def test_sharded_layer_equals_unsharded_and_flax(name, make, spec, axis_type):
    x, cotangent = _data()
    ours, theirs = make(jaxnorm.linen), make(nn)
    variables = ours.init(jax.random.key(0), x)
    replicated = jax.tree.map(lambda _: P(), variables, is_leaf=lambda v: v is None)
    sharded = _sharded(_step(ours), axis_type, (replicated, spec, spec), variables, x,
                       cotangent)
    unsharded = jax.device_get(jax.jit(_step(ours))(variables, x, cotangent))
    flax_result = jax.device_get(jax.jit(_step(theirs))(variables, x, cotangent))
    _assert_trees_close(sharded, unsharded, **TOLERANCE)
    _assert_trees_close(sharded, flax_result, **TOLERANCE)
    y, updates, _ = sharded
    assert np.all(np.isfinite(y))
    if "batch_norm" in name:  # momentum 0.99 from 0: the running mean moved to 0.01 mu_B
        mean = updates["batch_stats"]["mean"]
        np.testing.assert_allclose(mean, 0.01 * x.mean((0, 1, 2)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_sharded_nnx_batch_norm_equals_flax(axis_type):
    x, _ = _data()
    ours = jaxnorm.nnx.BatchNorm(16, rngs=nnx.Rngs(0))
    theirs = nnx.BatchNorm(16, rngs=nnx.Rngs(0))

    @nnx.jit
    def forward(model, x):
        return model(x)

    mesh = _mesh(axis_type)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("d")))
        y = forward(ours, xs)
    np.testing.assert_allclose(np.asarray(y), np.asarray(theirs(x)), **TOLERANCE)
    np.testing.assert_allclose(np.asarray(ours.mean[...]), np.asarray(theirs.mean[...]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.var[...]), np.asarray(theirs.var[...]),
                               **TOLERANCE)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("spec", [P("d"), P(None, "d")], ids=["batch", "spatial"])
def test_sharded_sets_keep_two_pass_accuracy_at_a_large_offset(spec, axis_type):
    # |mean| / std = 1e4 in float32: the one-pass formula would lose every digit
    x, _ = _data(offset=1e4, scale=1.0)
    _, mean, var = _sharded(lambda x: jaxnorm.batch_norm(x), axis_type, (spec,), x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean((0, 1, 2)), rtol=1e-7)
    np.testing.assert_allclose(var, x64.var((0, 1, 2)), rtol=1e-3)


@pytest.mark.parametrize("spec", [P("d"), P(None, "d")], ids=["batch", "spatial"])
def test_sharded_constant_input_gives_exactly_bias(spec):
    x = np.full((16, 8, 8, 16), 1234.5678, np.float32)
    bias = np.linspace(-1, 1, 16).astype(np.float32)
    y, _, var = _sharded(lambda x: jaxnorm.batch_norm(x, jnp.full(16, 3.0), bias),
                         AxisType.Explicit, (spec,), x)
    np.testing.assert_array_equal(var, 0.0)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, x.shape))


def test_sharded_masked_batch_counts_exactly():
    # unequal counts per shard, and shards with nothing counted
    x, _ = _data()
    mask = np.zeros(x.shape[:1], bool)
    mask[[0, 1, 2, 5, 12]] = True
    mask = np.broadcast_to(mask[:, None, None, None], x.shape)
    _, mean, var = _sharded(lambda x, m: jaxnorm.batch_norm(x, mask=m), AxisType.Explicit,
                            (P("d"), P("d")), x, mask)
    kept = x[mask[:, 0, 0, 0]].astype(np.float64)
    np.testing.assert_allclose(mean, kept.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, kept.var((0, 1, 2)), rtol=1e-5)


# ------------------------------------------------ synchronized statistics (axis_name)

# Statistics over these axes of x viewed as (members, examples per member, 8, 8, 16): the
# sets of each member merged with the same sets of the others (Flax's axis_name semantics)
SYNCED = [
    ("BatchNorm", lambda: jaxnorm.linen.BatchNorm(use_running_average=False, axis_name="d"),
     (0, 1, 2, 3)),
    ("GroupNorm", lambda: jaxnorm.linen.GroupNorm(num_groups=1, axis_name="d"), (0, 2, 3, 4)),
    ("InstanceNorm", lambda: jaxnorm.linen.InstanceNorm(axis_name="d"), (0, 2, 3)),
    ("LayerNorm", lambda: jaxnorm.linen.LayerNorm(reduction_axes=(0, 1, 2, 3),
                                                  axis_name="d"), (0, 1, 2, 3, 4)),
]


def _synced(module, x):
    variables = module.clone(axis_name=None).init(jax.random.key(0), x[:2])
    mesh = jax.make_mesh((DEVICES,), ("d",))

    def step(variables, x):
        return module.apply(variables, x, mutable=["batch_stats"])[0]

    mapped = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("d")), out_specs=P("d"))
    with jax.set_mesh(mesh):
        return np.asarray(jax.jit(mapped)(variables, jax.device_put(
            x, NamedSharding(mesh, P("d")))))


@pytest.mark.parametrize("name,make,axes", SYNCED, ids=[s[0] for s in SYNCED])
def test_synchronized_statistics_are_stable_from_the_first_step(name, make, axes):
    # mean 1e4, std 1, running mean 0: the old running-mean shift lost the variance
    # (off by a factor of 23); each member's own moments merged exactly keep it
    x, _ = _data(offset=1e4, scale=1.0, seed=3)
    view = (DEVICES, -1) + x.shape[1:]
    y = _synced(make(), x).astype(np.float64).reshape(view)
    x64 = x.astype(np.float64).reshape(view)
    eps = 1e-5 if name == "BatchNorm" else 1e-6
    expected = (x64 - x64.mean(axes, keepdims=True)) / np.sqrt(
        x64.var(axes, keepdims=True) + eps)
    # y = (x - mean) / std: a variance error e shows as a relative error e / 2 of y's
    # spread; float32 x at 1e4 is itself rounded by 5e-4 std
    np.testing.assert_allclose(y.std(axes), expected.std(axes), rtol=5e-4)
    np.testing.assert_allclose(y, expected, atol=2e-3)


def _collectives(hlo):
    kinds = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
    found = re.findall(r"=\s*[^=]*?\b(" + "|".join(kinds) + r")(?:-start)?\(", hlo)
    return {k: found.count(k) for k in kinds if k in found}


def test_synchronized_batch_norm_costs_one_collective_each_way():
    x, cotangent = _data()
    mesh = jax.make_mesh((DEVICES,), ("d",))

    def forward(x):
        return jaxnorm.batch_norm(x, axis_name="d")[0]

    def backward(x, cotangent):
        return jax.vjp(forward, x)[1](cotangent)[0]

    in_specs = P("d")
    with jax.set_mesh(mesh):
        x, cotangent = (jax.device_put(a, NamedSharding(mesh, in_specs)) for a in (x, cotangent))
        forward_hlo = jax.jit(jax.shard_map(forward, mesh=mesh, in_specs=in_specs,
                                            out_specs=in_specs)).lower(x).compile().as_text()
        both_hlo = jax.jit(jax.shard_map(backward, mesh=mesh, in_specs=(in_specs, in_specs),
                                         out_specs=in_specs)).lower(x, cotangent).compile(
                                             ).as_text()
    assert _collectives(forward_hlo) == {"all-gather": 1}
    assert sum(_collectives(both_hlo).values()) == 2


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_gspmd_batch_norm_costs_one_collective_each_way(axis_type):
    # Explicit: the sharded batch viewed as (shards, rest); Auto (under jax.set_mesh): the
    # batch cut into one member per device; both gather the members' moments once
    x, cotangent = _data()
    mesh = _mesh(axis_type)

    def forward(x):
        return jaxnorm.batch_norm(x)[0]

    def backward(x, cotangent):
        return jax.vjp(forward, x)[1](cotangent)[0]

    with jax.set_mesh(mesh):
        xs, cs = (jax.device_put(a, NamedSharding(mesh, P("d"))) for a in (x, cotangent))
        forward_hlo = jax.jit(forward).lower(xs).compile().as_text()
        both_hlo = jax.jit(backward).lower(xs, cs).compile().as_text()
    assert sum(_collectives(forward_hlo).values()) == 1
    assert sum(_collectives(both_hlo).values()) == 2


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
def test_sharded_ghost_batches_and_renorm_equal_the_unsharded_layers(axis_type):
    x, cotangent = _data()
    for module in (jaxnorm.linen.BatchNorm(use_running_average=False, virtual_batch_size=2),
                   jaxnorm.linen.BatchRenorm(use_running_average=False)):
        variables = module.init(jax.random.key(0), x)
        replicated = jax.tree.map(lambda _: P(), variables, is_leaf=lambda v: v is None)
        sharded = _sharded(_step(module), axis_type, (replicated, P("d"), P("d")),
                           variables, x, cotangent)
        unsharded = jax.device_get(jax.jit(_step(module))(variables, x, cotangent))
        _assert_trees_close(sharded, unsharded, **TOLERANCE)


def test_ghost_batch_spanning_shards_is_a_clear_error():
    # 16 examples over 8 shards: 2 per shard, a ghost batch of 4 would span two devices
    x, _ = _data()
    with pytest.raises(ValueError, match="virtual_batch_size=4 must divide the 2 examples"):
        _sharded(lambda x: jaxnorm.batch_norm(x, virtual_batch_size=4), AxisType.Explicit,
                 (P("d"),), x)


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("spec", [P("data", "model"), P("data", None, None, "model"),
                                  P(("data", "model"))], ids=["batch-rows", "batch-channels",
                                                              "batch-both-axes"])
def test_two_dimensional_mesh_shardings_equal_the_unsharded_layers(spec, axis_type):
    # two sharded reduction axes at once (batch over "data", rows over "model"), a sharded
    # kept axis (channels), and the batch over both mesh axes
    x, cotangent = _data()
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type, axis_type))
    for layer in (lambda x: jaxnorm.batch_norm(x)[0],
                  lambda x: jaxnorm.group_norm(x, num_groups=4)):
        def step(x, cotangent, layer=layer):
            y, pullback = jax.vjp(layer, x)
            return y, pullback(cotangent)[0]

        with jax.set_mesh(mesh):
            placed = [jax.device_put(a, NamedSharding(mesh, spec)) for a in (x, cotangent)]
            sharded = jax.device_get(jax.jit(step)(*placed))
        _assert_trees_close(sharded, jax.device_get(jax.jit(step)(x, cotangent)), **TOLERANCE)


STYLE_IDS = np.arange(16) % 3
OTHER_LAYERS = [
    ("local_response_norm", lambda: jaxnorm.linen.LocalResponseNorm(), lambda x: (x,)),
    ("adaptive_instance_norm", lambda: jaxnorm.linen.AdaptiveInstanceNorm(),
     lambda x: (x, 2 * x[::-1] + 1)),
    ("conditional_instance_norm", lambda: jaxnorm.linen.ConditionalInstanceNorm(num_styles=3),
     lambda x: (x, jnp.asarray(STYLE_IDS))),
]


@pytest.mark.parametrize("spec", [P("d"), P(None, "d"), P(None, None, None, "d")],
                         ids=["batch", "spatial", "channels"])
@pytest.mark.parametrize("name,make,arguments", OTHER_LAYERS, ids=[c[0] for c in OTHER_LAYERS])
def test_other_layers_sharded_on_an_explicit_mesh_equal_the_unsharded_layers(
        name, make, arguments, spec):
    x, cotangent = _data()
    module = make()
    variables = module.init(jax.random.key(0), *arguments(x))

    def step(x, cotangent):
        y, pullback = jax.vjp(lambda x: module.apply(variables, *arguments(x)), x)
        return y, pullback(cotangent)[0]

    sharded = _sharded(step, AxisType.Explicit, (spec, spec), x, cotangent)
    _assert_trees_close(sharded, jax.device_get(jax.jit(step)(x, cotangent)), **TOLERANCE)
