"""Transformer options of LayerNorm and RMSNorm: the zero-centred scale y = x̂·(1 + γ)
(Gemma, Transformer Engine), RMSNorm's optional bias, and the residual addition returned
with the norm of the sum (``jaxnorm.add_and_norm``); against float64 NumPy formulas and
the hand-derived gradients of ``tests/reference.py``, under jit, grad and vmap."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm
from jaxnorm import linen as jl
from jaxnorm import nnx as jx
from tests import reference

TOLERANCE = {"rtol": 1e-10, "atol": 1e-10}
EPS = 1e-6


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _random(seed: int, *shapes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for shape in shapes]


def gemma_rms_norm(x: np.ndarray, scale: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Gemma's RMSNorm, in float64: ``x * rsqrt(mean(x**2, -1) + eps) * (1 + scale)``."""
    mean_square = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(mean_square + eps) * (1.0 + scale)


def numpy_layer_norm(x: np.ndarray, eps: float = EPS) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)


def _vjp(fn, primals, cotangent):
    """``(fn(*primals), vjp(cotangent))`` in one jitted program."""

    def forward_and_backward(primals, cotangent):
        out, pullback = jax.vjp(fn, *primals)
        return out, pullback(cotangent)

    return jax.jit(forward_and_backward)(primals, cotangent)


# ------------------------------------------------------------------ zero-centred scale


@pytest.mark.usefixtures("x64")
def test_zero_centered_rms_norm_is_gemmas_formula():
    x, scale, bias = _random(0, (3, 5, 8), (8,), (8,))
    y = jax.jit(lambda x, s: jaxnorm.rms_norm(x, s, eps=EPS, zero_centered_scale=True))(x, scale)
    np.testing.assert_allclose(y, gemma_rms_norm(x, scale), **TOLERANCE)
    with_bias = jaxnorm.rms_norm(x, scale, bias, eps=EPS, zero_centered_scale=True)
    np.testing.assert_allclose(with_bias, gemma_rms_norm(x, scale) + bias, **TOLERANCE)


@pytest.mark.usefixtures("x64")
def test_zero_centered_layer_norm_multiplies_by_one_plus_scale():
    x, scale, bias = _random(1, (4, 6), (6,), (6,))
    y = jaxnorm.layer_norm(x, scale, bias, eps=EPS, zero_centered_scale=True)
    np.testing.assert_allclose(y, numpy_layer_norm(x) * (1.0 + scale) + bias, **TOLERANCE)
    zero = jaxnorm.layer_norm(x, np.zeros(6), eps=EPS, zero_centered_scale=True)
    np.testing.assert_allclose(zero, numpy_layer_norm(x), **TOLERANCE)  # γ = 0: identity


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
def test_zero_centered_gradients_match_hand_formula(centered):
    x, dy, scale, bias = _random(2, (5, 7), (5, 7), (7,), (7,))
    norm = jaxnorm.layer_norm if centered else jaxnorm.rms_norm

    def fn(x, scale, bias):
        return norm(x, scale, bias, eps=1e-3, zero_centered_scale=True)

    y, (dx, dscale, dbias) = _vjp(fn, (x, scale, bias), dy)
    # the hand formula with the effective multiplier 1 + γ; d/dγ = d/d(1 + γ)
    expected_y = reference.normalize(x, -1, 1.0 + scale, bias, eps=1e-3, centered=centered)
    expected = reference.normalize_vjp(dy, x, -1, 1.0 + scale, bias, eps=1e-3,
                                       centered=centered)
    np.testing.assert_allclose(y, expected_y, **TOLERANCE)
    for actual, wanted in zip((dx, dscale, dbias), expected, strict=True):
        np.testing.assert_allclose(actual, wanted, **TOLERANCE)


@pytest.mark.usefixtures("x64")
def test_rms_norm_bias_value_and_gradient():
    x, dy, scale, bias = _random(3, (4, 3, 6), (4, 3, 6), (6,), (6,))
    y, (dx, dscale, dbias) = _vjp(lambda x, s, b: jaxnorm.rms_norm(x, s, b, eps=1e-4),
                                  (x, scale, bias), dy)
    rms = np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(y, x / rms * scale + bias, **TOLERANCE)
    expected = reference.normalize_vjp(dy, x, -1, scale, bias, eps=1e-4, centered=False)
    for actual, wanted in zip((dx, dscale, dbias), expected, strict=True):
        np.testing.assert_allclose(actual, wanted, **TOLERANCE)
    np.testing.assert_allclose(dbias, dy.sum(axis=(0, 1)), **TOLERANCE)


def test_zero_centered_half_precision_scale_keeps_its_digits():
    """1 + γ is formed in float32: a bfloat16 γ of 1e-3 is not rounded away (1 + γ in
    bfloat16 would be exactly 1), and the output dtype is what the stored dtypes give."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16)), jnp.float32)
    gamma = jnp.full((16,), 1e-3, jnp.bfloat16)
    y = jaxnorm.rms_norm(x, gamma, eps=0.0, zero_centered_scale=True)
    assert y.dtype == jnp.float32
    plain = jaxnorm.rms_norm(x, eps=0.0)
    np.testing.assert_allclose(y, plain * (1.0 + float(gamma[0])), rtol=1e-6)
    assert not np.allclose(y, plain, rtol=1e-4)
    half = jaxnorm.layer_norm(x.astype(jnp.bfloat16), gamma, zero_centered_scale=True)
    assert half.dtype == jnp.bfloat16


def test_zero_centered_works_under_vmap_over_parameter_sets():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 8)), jnp.float32)
    scales = jnp.asarray(np.random.default_rng(6).normal(size=(4, 8)), jnp.float32)
    mapped = jax.vmap(lambda s: jaxnorm.rms_norm(x, s, zero_centered_scale=True))(scales)
    for row, scale in zip(mapped, scales, strict=True):
        np.testing.assert_allclose(row, gemma_rms_norm(np.asarray(x, np.float64),
                                                       np.asarray(scale, np.float64)),
                                   rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ modules


def test_zero_centered_modules_start_at_zero_and_match_the_function():
    x = jnp.asarray(np.random.default_rng(7).normal(2.0, 3.0, size=(2, 5, 8)), jnp.float32)
    for linen_cls, nnx_cls, function in ((jl.LayerNorm, jx.LayerNorm, jaxnorm.layer_norm),
                                         (jl.RMSNorm, jx.RMSNorm, jaxnorm.rms_norm)):
        module = linen_cls(zero_centered_scale=True)
        variables = module.init(jax.random.key(0), x)
        np.testing.assert_array_equal(variables["params"]["scale"], np.zeros(8))
        trained = jax.tree.map(lambda v: v + 0.5, variables)  # γ = 0.5: multiplier 1.5
        expected = 1.5 * function(x) + (0.5 if linen_cls is jl.LayerNorm else 0.0)
        np.testing.assert_allclose(module.apply(trained, x), expected, rtol=1e-5, atol=1e-5)
        layer = nnx_cls(8, zero_centered_scale=True, rngs=nnx.Rngs(0))
        np.testing.assert_array_equal(layer.scale[...], np.zeros(8))
        np.testing.assert_allclose(layer(x), module.apply(variables, x), rtol=1e-6, atol=1e-6)
    custom = jl.RMSNorm(zero_centered_scale=True, scale_init=jax.nn.initializers.constant(0.25))
    np.testing.assert_array_equal(  # an explicit initializer sets γ itself
        custom.init(jax.random.key(0), x)["params"]["scale"], np.full(8, 0.25))


def test_rms_norm_modules_with_bias():
    x = jnp.asarray(np.random.default_rng(8).normal(size=(3, 6)), jnp.float32)
    module = jl.RMSNorm(use_bias=True, bias_init=jax.nn.initializers.constant(0.5))
    variables = module.init(jax.random.key(0), x)
    assert set(variables["params"]) == {"scale", "bias"}
    np.testing.assert_allclose(module.apply(variables, x), jaxnorm.rms_norm(x) + 0.5, atol=1e-6)
    assert set(jl.RMSNorm().init(jax.random.key(0), x)["params"]) == {"scale"}  # Flax's tree
    layer = jx.RMSNorm(6, use_bias=True, bias_init=jax.nn.initializers.constant(0.5),
                       rngs=nnx.Rngs(0))
    np.testing.assert_allclose(layer(x), module.apply(variables, x), atol=1e-6)
    assert jx.RMSNorm(6, rngs=nnx.Rngs(0)).bias is None


# ------------------------------------------------------------------ add_and_norm


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_add_and_norm_values_and_gradients_match_hand_formula(kind):
    x, residual, dy, dsum = _random(9, (4, 3, 6), (4, 3, 6), (4, 3, 6), (4, 3, 6))
    scale, bias = _random(10, (6,), (6,))

    def fn(x, residual, scale, bias):
        return jaxnorm.add_and_norm(x, residual, scale, bias, kind=kind, eps=1e-3)

    (y, summed), (dx, dresidual, dscale, dbias) = _vjp(
        fn, (x, residual, scale, bias), (dy, dsum)
    )
    s = x + residual
    centered = kind == "layer"
    np.testing.assert_allclose(summed, s, **TOLERANCE)
    np.testing.assert_allclose(
        y, reference.normalize(s, -1, scale, bias, eps=1e-3, centered=centered), **TOLERANCE
    )
    # d/dx = d/dresidual = dsum + (∂y/∂s)ᵀ dy
    ds, expected_dscale, expected_dbias = reference.normalize_vjp(
        dy, s, -1, scale, bias, eps=1e-3, centered=centered
    )
    np.testing.assert_allclose(dx, dsum + ds, **TOLERANCE)
    np.testing.assert_allclose(dresidual, dsum + ds, **TOLERANCE)
    np.testing.assert_allclose(dscale, expected_dscale, **TOLERANCE)
    np.testing.assert_allclose(dbias, expected_dbias, **TOLERANCE)


@pytest.mark.usefixtures("x64")
def test_add_and_norm_zero_centered_and_vmap():
    x, residual, scale = _random(11, (5, 8), (5, 8), (8,))
    y, s = jaxnorm.add_and_norm(x, residual, scale, kind="rms", eps=EPS,
                                zero_centered_scale=True)
    np.testing.assert_allclose(y, gemma_rms_norm(x + residual, scale), **TOLERANCE)
    # per-example under vmap: the same as the batch
    per_row = jax.vmap(lambda a, b: jaxnorm.add_and_norm(a, b, scale, kind="rms", eps=EPS,
                                                         zero_centered_scale=True))
    mapped_y, mapped_s = per_row(x, residual)
    np.testing.assert_allclose(mapped_y, y, **TOLERANCE)
    np.testing.assert_allclose(mapped_s, s, **TOLERANCE)


def _entry_instructions(function, *args) -> list[str]:
    text = jax.jit(function).lower(*args).compile().as_text()
    return [line.strip() for line in text[text.index("ENTRY"):].splitlines()[1:]
            if "=" in line]


def _reads_of(instructions: list[str], name: str) -> list[str]:
    return [i for i in instructions if re.search(rf"[(,]\s*%?{re.escape(name)}[,)]", i)
            and "parameter(" not in i]


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_add_and_norm_reads_its_inputs_once_and_adds_nothing_to_the_norm(kind):
    """Compiled on CPU: one kernel reads ``x`` and ``residual`` and produces the sum (the
    returned stream); the normalization reads that sum and its kernels are exactly those
    of the normalization alone."""
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
    features = jax.ShapeDtypeStruct((256,), jnp.float32)
    norm = jaxnorm.layer_norm if kind == "layer" else jaxnorm.rms_norm
    fused = _entry_instructions(
        lambda x, r, g, b: jaxnorm.add_and_norm(x, r, g, b, kind=kind), x, x, features,
        features,
    )
    params = {p.split("=")[0].strip(): p for p in fused if "parameter(" in p}
    x_name = next(n for n, p in params.items() if "parameter(0)" in p).lstrip("%")
    r_name = next(n for n, p in params.items() if "parameter(1)" in p).lstrip("%")
    (x_reader,) = _reads_of(fused, x_name)
    (r_reader,) = _reads_of(fused, r_name)
    assert x_reader == r_reader
    sum_name = x_reader.split("=")[0].strip().lstrip("%")
    root = next(i for i in fused if i.startswith("ROOT"))
    assert re.search(rf",\s*%?{re.escape(sum_name)}\)", root)  # the sum is the 2nd output
    alone = _entry_instructions(lambda s, g, b: norm(s, g, b), x, features, features)

    def kernels(instructions: list[str]) -> int:
        return sum(bool(re.search(r"= \S+ (fusion|custom-call|reduce|copy)\(", i))
                   for i in instructions)

    assert kernels(fused) == kernels(alone) + 1


def test_add_and_norm_errors_name_the_argument():
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="kind must be one of"):
        jaxnorm.add_and_norm(x, x, kind="batch")
    with pytest.raises(ValueError, match="residual has shape"):
        jaxnorm.add_and_norm(x, jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="residual must have a floating dtype"):
        jaxnorm.add_and_norm(x, jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="kind must be one of"):
        jx.AddAndNorm(4, kind="group", rngs=nnx.Rngs(0))


def test_add_and_norm_modules_keep_the_norms_parameters():
    rng = np.random.default_rng(12)
    x, residual = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(2, 2, 5, 8)))
    for kind, twin, names in (("layer", jl.LayerNorm, {"scale", "bias"}),
                              ("rms", jl.RMSNorm, {"scale"})):
        module = jl.AddAndNorm(kind=kind)
        variables = module.init(jax.random.key(0), x, residual)
        assert set(variables["params"]) == names
        variables = jax.tree.map(lambda v: v + rng.normal(size=v.shape), variables)
        y, s = module.apply(variables, x, residual)
        np.testing.assert_allclose(s, x + residual, atol=1e-6)
        np.testing.assert_allclose(y, twin().apply(variables, x + residual), atol=1e-5)
        layer = jx.AddAndNorm(8, kind=kind, rngs=nnx.Rngs(0))
        nnx.update(layer, nnx.State({k: nnx.Param(v) for k, v in variables["params"].items()}))
        nnx_y, nnx_s = layer(x, residual)
        np.testing.assert_allclose(nnx_y, y, atol=1e-6)
        np.testing.assert_allclose(nnx_s, s, atol=1e-6)


def test_add_and_norm_keeps_a_float32_stream_for_bfloat16_branches():
    x = jnp.ones((2, 8), jnp.bfloat16)
    residual = jnp.asarray(np.random.default_rng(13).normal(size=(2, 8)), jnp.float32)
    module = jl.AddAndNorm(dtype=jnp.bfloat16)
    y, s = module.apply(module.init(jax.random.key(0), x, residual), x, residual)
    assert s.dtype == jnp.float32 and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(s, residual + 1.0)
