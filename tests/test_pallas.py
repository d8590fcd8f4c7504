"""The Pallas kernels (``implementation="pallas"``), in interpret mode off a GPU: values and
gradients against the XLA path and float64 references, odd sizes, exact bias for constant
rows, accuracy far from zero, ``vmap``/``jit``, the modules, the errors, and the GPU check
script's CPU path. Shapes are small: interpret mode is slow."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
from jaxnorm import linen as jl
from jaxnorm import nnx as jx

EPS = 1e-5
NORMS = {"layer": jaxnorm.layer_norm, "rms": jaxnorm.rms_norm}


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    """These are the Triton kernels' tests: on a GPU whose measured table prefers Mosaic
    GPU for a shape, the dispatcher would otherwise run that (tests/test_pallas_mosaic.py)."""
    from jaxnorm import _pallas_dispatch as dispatch

    monkeypatch.setattr(dispatch, "BACKEND", "triton")


def _reference(x, scale, bias, dy, centered: bool):
    """float64 ``(y, dx, dscale, dbias)`` of a row normalization over the last axis."""
    x, scale, bias, dy = (np.asarray(a, np.float64) for a in (x, scale, bias, dy))
    centred = x - x.mean(-1, keepdims=True) if centered else x
    rstd = 1 / np.sqrt((centred**2).mean(-1, keepdims=True) + EPS)
    x_hat = centred * rstd
    g = dy * scale
    dx = g - x_hat * (g * x_hat).mean(-1, keepdims=True)
    if centered:
        dx = dx - g.mean(-1, keepdims=True)
    return x_hat * scale + bias, dx * rstd, (dy * x_hat).sum(0), dy.sum(0)


def _inputs(rows: int, features: int, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = (jax.random.normal(keys[0], (rows, features)) * 2 + 1).astype(dtype)
    scale = (1 + 0.5 * jax.random.normal(keys[1], (features,))).astype(dtype)
    bias = jax.random.normal(keys[2], (features,)).astype(dtype)
    dy = jax.random.normal(keys[3], (rows, features)).astype(dtype)
    return x, scale, bias, dy


@functools.partial(jax.jit, static_argnums=(0, 1))
def _value_and_grads(kind: str, implementation: str, x, scale, bias, dy):
    norm = NORMS[kind]
    y, pullback = jax.vjp(
        lambda *a: norm(*a, eps=EPS, implementation=implementation), x, scale, bias
    )
    return (y, *pullback(dy.astype(y.dtype)))


def _close(a, b, tol: float) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("kind,rows,features", [
    ("layer", 3, 1), ("layer", 5, 7), ("layer", 3, 1000), ("rms", 5, 7), ("rms", 4, 129),
])
def test_values_and_gradients_float32(kind: str, rows: int, features: int) -> None:
    inputs = _inputs(rows, features, jnp.float32)
    pallas = _value_and_grads(kind, "pallas", *inputs)
    xla = _value_and_grads(kind, "xla", *inputs)
    reference = _reference(*inputs, centered=kind == "layer")
    for ours, theirs, exact in zip(pallas, xla, reference):
        assert ours.dtype == theirs.dtype
        _close(ours, theirs, 2e-5)
        _close(ours, exact, 2e-5)


@pytest.mark.parametrize("kind,rows,features", [("layer", 5, 129), ("rms", 3, 7)])
def test_values_and_gradients_bfloat16(kind: str, rows: int, features: int) -> None:
    inputs = _inputs(rows, features, jnp.bfloat16, seed=1)
    pallas = _value_and_grads(kind, "pallas", *inputs)
    xla = _value_and_grads(kind, "xla", *inputs)
    reference = _reference(*inputs, centered=kind == "layer")
    for ours, theirs, exact in zip(pallas, xla, reference):
        assert ours.dtype == jnp.bfloat16
        _close(ours, theirs, 3e-2)
        _close(ours, exact, 3e-2)


def test_mixed_dtypes_promote() -> None:
    """bfloat16 ``x`` with float32 parameters: float32 ``y``, as the XLA path."""
    x, scale, bias, _ = _inputs(3, 7, jnp.float32)
    x = x.astype(jnp.bfloat16)
    ours = jaxnorm.layer_norm(x, scale, bias, implementation="pallas")
    theirs = jaxnorm.layer_norm(x, scale, bias, implementation="xla")
    assert ours.dtype == theirs.dtype == jnp.float32
    _close(ours, theirs, 1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_constant_rows_give_exactly_bias(dtype) -> None:
    x = jnp.broadcast_to(jnp.array([[0.1], [-3.7], [1e4]], dtype), (3, 129))
    scale = jnp.linspace(0.5, 2.0, 129, dtype=dtype)
    bias = jnp.linspace(-1.0, 1.0, 129, dtype=dtype)
    y = jaxnorm.layer_norm(x, scale, bias, implementation="pallas")
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(np.asarray(bias), y.shape))


def test_far_from_zero_is_accurate() -> None:
    """|mean|/std = 1e4 in float32: the shifted two-pass variance keeps the digits."""
    x, scale, bias, dy = _inputs(6, 1000, jnp.float32, seed=2)
    x = x / 2 + 1e4
    pallas = _value_and_grads("layer", "pallas", x, scale, bias, dy)
    reference = _reference(x, scale, bias, dy, centered=True)
    for ours, exact in zip(pallas, reference):
        _close(ours, exact, 2e-4)


def test_several_trailing_axes_and_zero_centered_scale() -> None:
    x = jax.random.normal(jax.random.key(3), (2, 3, 4, 5))
    scale = jax.random.normal(jax.random.key(4), (4, 5)) * 0.1
    options = dict(reduction_axes=(-2, -1), feature_axes=(2, 3), zero_centered_scale=True)
    ours = jaxnorm.layer_norm(x, scale, implementation="pallas", **options)
    theirs = jaxnorm.layer_norm(x, scale, implementation="xla", **options)
    _close(ours, theirs, 2e-5)


def test_no_parameters_and_empty_input() -> None:
    x = jax.random.normal(jax.random.key(5), (4, 9))
    _close(jaxnorm.rms_norm(x, implementation="pallas"), jaxnorm.rms_norm(x), 2e-5)
    empty = jnp.zeros((0, 9))
    assert jaxnorm.layer_norm(empty, implementation="pallas").shape == (0, 9)


def test_vmap_and_jit() -> None:
    x, scale, bias, dy = _inputs(12, 33, jnp.float32, seed=6)
    x, dy = x.reshape(3, 4, 33), dy.reshape(3, 4, 33)

    def loss(x, scale, bias, implementation):
        y = jax.vmap(lambda row: jaxnorm.layer_norm(
            row, scale, bias, eps=EPS, implementation=implementation))(x)
        return jnp.sum(y * dy)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    (ours, ours_grads), (theirs, theirs_grads) = grad(x, scale, bias, "pallas"), grad(
        x, scale, bias, "xla")
    _close(ours, theirs, 2e-5)
    for a, b in zip(ours_grads, theirs_grads):
        _close(a, b, 2e-5)


def test_modules_with_pallas() -> None:
    x = jax.random.normal(jax.random.key(7), (3, 10))
    for cls in (jl.LayerNorm, jl.RMSNorm):
        pallas, xla = cls(implementation="pallas"), cls()
        params = xla.init(jax.random.key(0), x)
        _close(pallas.apply(params, x), xla.apply(params, x), 2e-5)
    for cls in (jx.LayerNorm, jx.RMSNorm):
        pallas = cls(10, rngs=nnx.Rngs(0), implementation="pallas")
        xla = cls(10, rngs=nnx.Rngs(0))
        _close(pallas(x), xla(x), 2e-5)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_errors_name_the_argument(kind: str) -> None:
    norm = NORMS[kind]
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="implementation must be one of"):
        norm(x, implementation="triton")
    with pytest.raises(ValueError, match="implementation='pallas'.*mask"):
        norm(x, mask=x > 0, implementation="pallas")
    with pytest.raises(ValueError, match="implementation='pallas'.*axis_name"):
        norm(x, axis_name="batch", implementation="pallas")
    with pytest.raises(ValueError, match="implementation='pallas'.*trailing"):
        norm(x, reduction_axes=0, feature_axes=0, implementation="pallas")
    with pytest.raises(ValueError, match="implementation='pallas'.*complex"):
        norm(x.astype(jnp.complex64), implementation="pallas")
    with pytest.raises(ValueError, match="implementation must be one of"):
        jl.LayerNorm(implementation="Pallas").init(jax.random.key(0), x)


def test_gpu_check_script_cpu_path(tmp_path: pathlib.Path) -> None:
    """``benchmarks/pallas_check.py --tiny`` runs its cases interpreted and writes JSON."""
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "pallas_check.py"
    spec = importlib.util.spec_from_file_location("pallas_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "check.json"
    assert module.main([str(out), "--tiny", "--dtypes", "float32"]) == 0
    results = json.loads(out.read_text())
    assert results["cases"] and all(case["ok"] for case in results["cases"]), results
    # each case records the backend the dispatcher planned (Triton here: pinned above)
    assert {case["backend"] for case in results["cases"]} == {"triton"}
    assert results["environment"]["kernel_backend"] == "default"


def _group_reference(x, scale, bias, dy, groups: int):
    """float64 ``(y, dx, dscale, dbias)`` of channels-last GroupNorm."""
    x, scale, bias, dy = (np.asarray(a, np.float64) for a in (x, scale, bias, dy))
    shape = x.shape
    sets = (shape[0], -1, groups, shape[-1] // groups)
    xs, gs = x.reshape(sets), (dy * scale).reshape(sets)
    centred = xs - xs.mean((1, 3), keepdims=True)
    rstd = 1 / np.sqrt((centred**2).mean((1, 3), keepdims=True) + EPS)
    x_hat = centred * rstd
    dx = rstd * (gs - gs.mean((1, 3), keepdims=True)
                 - x_hat * (gs * x_hat).mean((1, 3), keepdims=True))
    x_hat = x_hat.reshape(shape)
    axes = tuple(range(len(shape) - 1))
    return (x_hat * scale + bias, dx.reshape(shape), (dy * x_hat).sum(axes), dy.sum(axes))


def _group_inputs(shape: tuple[int, ...], dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    channels = shape[-1]
    x = (jax.random.normal(keys[0], shape) * 2 + 1).astype(dtype)
    scale = (1 + 0.5 * jax.random.normal(keys[1], (channels,))).astype(dtype)
    bias = jax.random.normal(keys[2], (channels,)).astype(dtype)
    return x, scale, bias, jax.random.normal(keys[3], shape).astype(dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _group_value_and_grads(kind: str, groups: int, implementation: str, x, scale, bias, dy):
    if kind == "group":
        def norm(*a):
            return jaxnorm.group_norm(*a, num_groups=groups, eps=EPS,
                                      implementation=implementation)
    else:
        def norm(*a):
            return jaxnorm.instance_norm(*a, eps=EPS, implementation=implementation)
    y, pullback = jax.vjp(norm, x, scale, bias)
    return (y, *pullback(dy.astype(y.dtype)))


@pytest.mark.parametrize("kind,shape,groups,dtype", [
    ("group", (3, 11, 10), 5, jnp.float32),
    ("group", (2, 7, 12), 3, jnp.bfloat16),
    ("instance", (2, 3, 5, 7), 7, jnp.float32),
    ("instance", (3, 9, 4), 4, jnp.bfloat16),
])
def test_group_and_instance_values_and_gradients(kind, shape, groups, dtype) -> None:
    inputs = _group_inputs(shape, dtype)
    pallas = _group_value_and_grads(kind, groups, "pallas", *inputs)
    xla = _group_value_and_grads(kind, groups, "xla", *inputs)
    reference = _group_reference(*inputs, groups=groups)
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    for ours, theirs, exact in zip(pallas, xla, reference):
        assert ours.dtype == theirs.dtype
        _close(ours, theirs, tol)
        _close(ours, exact, tol)


def test_group_norm_many_tiles_per_program() -> None:
    """More tiles than programs: each program merges several tiles' moments (Chan)."""
    from jaxnorm import _pallas_group_norm as gn

    tiling = gn.make_group_tiling(2, 300, 200, 4)
    assert tiling.steps > 1 or tiling.row_tiles > 1
    inputs = _group_inputs((2, 300, 200), jnp.float32, seed=3)
    inputs = (inputs[0] / 2 + 1e4, *inputs[1:])  # |mean|/std = 1e4
    pallas = _group_value_and_grads("group", 4, "pallas", *inputs)
    reference = _group_reference(*inputs, groups=4)
    for ours, exact in zip(pallas, reference):
        _close(ours, exact, 2e-4)


@pytest.mark.parametrize("kind", ["group", "instance"])
def test_group_constant_sets_give_exactly_bias(kind: str) -> None:
    x = jnp.broadcast_to(jnp.array([0.1, -3.7], jnp.float32)[:, None, None], (2, 9, 6))
    scale, bias = jnp.linspace(0.5, 2.0, 6), jnp.linspace(-1.0, 1.0, 6)
    y = _group_value_and_grads(kind, 3, "pallas", x, scale, bias, jnp.ones_like(x))[0]
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(np.asarray(bias), y.shape))


def test_group_modules_and_errors() -> None:
    x = jax.random.normal(jax.random.key(8), (2, 4, 4, 8))
    for cls, options in ((jl.GroupNorm, {"num_groups": 4}), (jl.InstanceNorm, {})):
        pallas, xla = cls(implementation="pallas", **options), cls(**options)
        params = xla.init(jax.random.key(0), x)
        _close(pallas.apply(params, x), xla.apply(params, x), 2e-5)
    pallas = jx.GroupNorm(8, num_groups=2, rngs=nnx.Rngs(0), implementation="pallas")
    _close(pallas(x), jx.GroupNorm(8, num_groups=2, rngs=nnx.Rngs(0))(x), 2e-5)
    pallas = jx.InstanceNorm(8, rngs=nnx.Rngs(0), implementation="pallas")
    _close(pallas(x), jx.InstanceNorm(8, rngs=nnx.Rngs(0))(x), 2e-5)
    with pytest.raises(ValueError, match="implementation='pallas'.*channels-last"):
        jaxnorm.group_norm(x, num_groups=2, feature_axis=1, implementation="pallas")
    with pytest.raises(ValueError, match="implementation='pallas'.*mask"):
        jaxnorm.instance_norm(x, mask=x > 0, implementation="pallas")
    with pytest.raises(ValueError, match="implementation='pallas'.*return_moments"):
        jaxnorm.instance_norm(x, return_moments=True, implementation="pallas")
    with pytest.raises(ValueError, match="implementation must be one of"):
        jaxnorm.group_norm(x, num_groups=2, implementation="cuda")


# Routing: every layer reaches its kernel through the dispatcher (jaxnorm._pallas_dispatch),
# and automatic selection (jaxnorm._implementation.select_implementation) never raises.

from jaxnorm import _implementation, _pallas_dispatch, _pallas_tuning  # noqa: E402
from jaxnorm._affine import NormSpec  # noqa: E402
from jaxnorm._dispatch import normalize_over  # noqa: E402
from jaxnorm._implementation import KernelCase, select_implementation  # noqa: E402

LAYERS = {
    "LayerNorm": (jaxnorm.layer_norm, {}, "row"),
    "RMSNorm": (jaxnorm.rms_norm, {}, "row"),
    "GroupNorm": (jaxnorm.group_norm, {"num_groups": 2}, "group"),
    "InstanceNorm": (jaxnorm.instance_norm, {}, "group"),
}


@pytest.fixture
def kernel_calls(monkeypatch) -> list[str]:
    """The kernels the dispatcher runs, in order (``"row"``/``"group"``), spied on."""
    calls: list[str] = []
    for name, attribute in (("row", "row_norm"), ("group", "group_norm_rows")):
        kernel = getattr(_pallas_dispatch, attribute)

        def spy(*args, _kernel=kernel, _name=name):
            calls.append(_name)
            return _kernel(*args)

        monkeypatch.setattr(_pallas_dispatch, attribute, spy)
    return calls


@pytest.fixture
def automatic_pallas(monkeypatch) -> list[KernelCase]:
    """Automatic selection as on a GPU whose timing table takes every kernel case; the
    cases it was asked about, in order."""
    seen: list[KernelCase] = []
    monkeypatch.setattr(_implementation, "gpu_backend", lambda: True)
    monkeypatch.setattr(_implementation, "kernel_stays_local", lambda: True)
    monkeypatch.setattr(_implementation, "measured_kernel_faster",
                        lambda case: seen.append(case) or True)
    return seen


def test_select_implementation(monkeypatch) -> None:
    case = KernelCase("row", "float32", True, 10, 3)
    assert select_implementation("pallas", None) == "pallas"
    assert select_implementation("xla", case) == "xla"
    assert select_implementation(None, case) == "xla"  # not on a GPU
    monkeypatch.setattr(_pallas_tuning, "MEASURED_FASTER", [])
    monkeypatch.setattr(_implementation, "gpu_backend", lambda: True)
    monkeypatch.setattr(_implementation, "kernel_stays_local", lambda: True)
    assert select_implementation(None, case) == "xla"  # no measurements
    monkeypatch.setattr(_pallas_tuning, "MEASURED_FASTER", [
        {"kernel": "layer_norm", "dtype": "float32", "width": 16, "pallas": True},
        {"kernel": "rms_norm", "dtype": "float32", "width": 16, "pallas": False},
        {"kernel": "group_norm", "dtype": "bfloat16", "width": 256, "pallas": True},
        {"kernel": "instance_norm", "dtype": "bfloat16", "width": 256, "pallas": False}])
    assert select_implementation(None, case) == "pallas"  # 10 features: width 16
    assert select_implementation(None, KernelCase("row", "float32", True, 9, 3)) == "pallas"
    assert select_implementation(None, KernelCase("row", "float32", True, 64, 3)) == "xla"
    assert select_implementation(None, KernelCase("row", "float32", False, 10, 3)) == "xla"
    assert select_implementation(None, KernelCase("row", "bfloat16", True, 10, 3)) == "xla"
    group = KernelCase("group", "bfloat16", True, 256, 64, 32, 16)
    assert select_implementation(None, group) == "pallas"
    instance = KernelCase("group", "bfloat16", True, 256, 64, 256, 16)
    assert select_implementation(None, instance) == "xla"
    monkeypatch.setattr(_implementation, "kernel_stays_local", lambda: False)
    assert select_implementation(None, case) == "xla"  # GSPMD could partition the call
    assert select_implementation(None, None) == "xla"
    monkeypatch.setattr(_implementation, "gpu_backend", lambda: False)
    assert select_implementation(None, case) == "xla"
    with pytest.raises(ValueError, match="implementation must be one of"):
        select_implementation("Pallas", case)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_explicit_pallas_runs_the_layer_kernel_through_the_dispatcher(
    layer: str, kernel_calls: list[str]
) -> None:
    norm, options, kernel = LAYERS[layer]
    x, scale, bias, _ = _group_inputs((2, 3, 5, 8), jnp.float32, seed=9)
    xla = norm(x, scale, bias, eps=EPS, implementation="xla", **options)
    automatic = norm(x, scale, bias, eps=EPS, **options)
    assert kernel_calls == []  # XLA, and automatic on the CPU with the empty table
    ours = norm(x, scale, bias, eps=EPS, implementation="pallas", **options)
    assert kernel_calls == [kernel]
    _close(ours, xla, 2e-5)
    _close(automatic, xla, 0)


@pytest.mark.parametrize("layer,shape", [
    ("LayerNorm", (4, 6)), ("RMSNorm", (2, 3, 6)), ("InstanceNorm", (2, 5, 6)),
])
def test_normalize_over_with_a_pallas_spec_returns_y_alone(layer: str, shape) -> None:
    x = jax.random.normal(jax.random.key(10), shape)
    scale = jnp.linspace(0.5, 1.5, 6).reshape((1,) * (len(shape) - 1) + (6,))
    reduction = tuple(range(1, len(shape) - 1)) if layer == "InstanceNorm" else (
        len(shape) - 1,)
    spec = NormSpec(reduction, EPS, jnp.dtype(jnp.float32), layer != "RMSNorm",
                    implementation="pallas", layer=layer)
    y, *statistics = normalize_over(x, scale, None, spec, statistics=False)
    assert statistics == [None, None, None]
    xla = normalize_over(x, scale, None, dataclasses.replace(spec, implementation="xla"))
    _close(y, xla[0], 2e-5)
    assert all(s is not None for s in xla[1:])
    with pytest.raises(ValueError, match="implementation='pallas'.*return_moments"):
        normalize_over(x, scale, None, spec)  # the caller needs the statistics


@pytest.mark.parametrize("layer,shape,expected", [
    ("LayerNorm", (3, 10), KernelCase("row", "float32", True, 10, 3)),
    ("RMSNorm", (2, 3, 10), KernelCase("row", "float32", False, 10, 6)),
    ("GroupNorm", (2, 4, 4, 8), KernelCase("group", "float32", True, 8, 32, 2, 16)),
    ("InstanceNorm", (2, 4, 4, 8), KernelCase("group", "float32", True, 8, 32, 8, 16)),
])
def test_automatic_selection_takes_the_kernel_where_the_table_says(
    layer: str, shape, expected: KernelCase, kernel_calls: list[str],
    automatic_pallas: list[KernelCase],
) -> None:
    norm, options, kernel = LAYERS[layer]
    x = jax.random.normal(jax.random.key(11), shape)
    ours = norm(x, eps=EPS, **options)
    assert automatic_pallas == [expected] and kernel_calls == [kernel]
    _close(ours, norm(x, eps=EPS, implementation="xla", **options), 2e-5)


def _ineligible_cases() -> list:
    x = jax.random.normal(jax.random.key(12), (2, 3, 4, 8))
    scale = jnp.linspace(0.5, 1.5, 8)
    return [
        pytest.param(lambda impl: jaxnorm.layer_norm(x, mask=x > 0, implementation=impl),
                     id="mask"),
        pytest.param(lambda impl: jaxnorm.rms_norm(x.astype(jnp.complex64),
                                                   implementation=impl), id="complex"),
        pytest.param(lambda impl: jaxnorm.layer_norm(x, reduction_axes=1, feature_axes=1,
                                                     implementation=impl), id="not-trailing"),
        pytest.param(lambda impl: jaxnorm.layer_norm(
            x, jnp.ones((4, 8)), reduction_axes=-1, feature_axes=(2, 3), implementation=impl),
            id="feature-axes"),
        pytest.param(lambda impl: jaxnorm.group_norm(x, num_groups=3, feature_axis=1,
                                                     implementation=impl), id="group-nchw"),
        pytest.param(lambda impl: jaxnorm.instance_norm(x, feature_axes=1,
                                                        implementation=impl), id="instance-nchw"),
        pytest.param(lambda impl: jaxnorm.instance_norm(x, scale, return_moments=True,
                                                        implementation=impl)[1].var,
                     id="return-moments"),
        pytest.param(lambda impl: jax.jit(lambda e: jaxnorm.layer_norm(
            x, eps=e, implementation=impl))(1e-3), id="traced-eps"),
        pytest.param(lambda impl: jax.vmap(lambda row: jaxnorm.layer_norm(
            row, axis_name="batch", implementation=impl), axis_name="batch")(x),
            id="axis-name"),
        pytest.param(lambda impl: jaxnorm.layer_norm(jnp.ones((1, 70000)), implementation=impl),
                     id="row-too-long"),
    ]


@pytest.mark.parametrize("call", _ineligible_cases())
def test_automatic_selection_falls_back_to_xla_for_an_ineligible_case(
    call, kernel_calls: list[str], automatic_pallas: list[KernelCase]
) -> None:
    """Where explicit ``"pallas"`` raises, automatic (even with a table taking every case)
    computes the XLA result silently."""
    with pytest.raises(ValueError, match="implementation='pallas'"):
        call("pallas")
    ours = call(None)
    assert kernel_calls == [] and automatic_pallas == []
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(call("xla")))


def test_group_kernel_shapes_through_the_dispatcher(kernel_calls: list[str]) -> None:
    """GroupNorm of ``(B, C)`` and of two spatial axes with a group per channel,
    InstanceNorm of ``(N, C)`` with ``allow_single_value``: the group kernel equals XLA."""
    x = jax.random.normal(jax.random.key(13), (3, 2, 5, 6))
    cases = (
        lambda i: jaxnorm.group_norm(x[:, 0, 0], num_groups=3, implementation=i),
        lambda i: jaxnorm.group_norm(x, num_groups=None, group_size=1, implementation=i),
        lambda i: jaxnorm.instance_norm(x[:, 0, 0], jnp.ones(6), jnp.arange(6.0),
                                        allow_single_value=True, implementation=i),
    )
    for norm in cases:
        _close(norm("pallas"), norm("xla"), 2e-5)
    assert kernel_calls == ["group"] * len(cases)


def test_automatic_kernels_only_where_the_call_stays_on_one_device() -> None:
    """GSPMD cannot partition a Pallas kernel: automatic selection keeps it to
    ``shard_map``/``pmap`` bodies and single-device runs."""
    from jax.sharding import AxisType, PartitionSpec

    seen = {}
    devices = jax.device_count()

    def probe(tag):
        seen[tag] = _implementation.kernel_stays_local()

    jax.jit(lambda x: (probe("jit"), x)[1])(jnp.ones(4))
    assert seen["jit"] == (devices == 1)
    jax.vmap(lambda x: (probe("vmap"), x)[1], axis_name="v")(jnp.ones(4))
    assert seen["vmap"] == (devices == 1)
    if devices < 2:
        return
    mesh = jax.make_mesh((2,), ("d",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        jax.jit(lambda x: (probe("auto"), x)[1])(jnp.ones(4))
        jax.jit(jax.shard_map(lambda x: (probe("shard_map"), x)[1],
                              in_specs=PartitionSpec("d"), out_specs=PartitionSpec("d")))(
            jnp.ones(4))
    assert not seen["auto"] and seen["shard_map"]
