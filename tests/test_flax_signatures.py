"""Drop-in means drop-in: every Linen field and NNX constructor argument of the five
classes Flax also has matches Flax's (name, default, order), except the documented
differences and extras listed here; and every module runs in both APIs on the same input."""

from __future__ import annotations

import dataclasses
import inspect

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxnorm import linen as jl
from jaxnorm import nnx as jx

# Wrappers of another layer (their own tests: tests/test_weight_norms.py).
WRAPPERS = {"SpectralNorm", "WeightNorm", "WeightStandardization"}
SHARED = ["BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm"]

# Documented in jaxnorm.linen's module docstring and the README's migration notes.
DIFFERENT_DEFAULTS = {"use_fast_variance": (False, True)}  # (jaxnorm, Flax)
RUNNING_STATISTICS = ["track_running_stats", "momentum", "use_running_average"]
EXTRAS = {
    "BatchNorm": ["unbiased_running_var", "virtual_batch_size"],
    "GroupNorm": ["feature_axis", "implementation"],
    "LayerNorm": ["zero_centered_scale", "implementation"],
    "RMSNorm": ["zero_centered_scale", "use_bias", "bias_init", "implementation"],
    "InstanceNorm": [*RUNNING_STATISTICS, "implementation"],
}
NNX_EXTRAS = {"BatchNorm": ["unbiased_running_var", "virtual_batch_size"],
              "GroupNorm": ["feature_axis", "implementation"],
              "LayerNorm": ["zero_centered_scale", "implementation"],
              "RMSNorm": ["zero_centered_scale", "use_bias", "bias_init", "bias_metadata",
                          "implementation"],
              "InstanceNorm": [*RUNNING_STATISTICS, "implementation"]}
MISSING = {}  # arguments Flax has and jaxnorm lacks: none


def _linen_fields(cls) -> list[tuple[str, object]]:
    return [(f.name, f.default) for f in dataclasses.fields(cls)
            if f.name not in ("parent", "name")]


def _nnx_parameters(cls) -> list[inspect.Parameter]:
    return list(inspect.signature(cls.__init__).parameters.values())[1:]


def _same_default(name, ours, theirs) -> bool:
    if name in DIFFERENT_DEFAULTS:
        return (ours, theirs) == DIFFERENT_DEFAULTS[name]
    if callable(ours) and callable(theirs) and name.endswith("_init"):
        key = jax.random.key(0)
        return bool(np.array_equal(ours(key, (3,), jnp.float32), theirs(key, (3,), jnp.float32)))
    return ours is theirs or ours == theirs


@pytest.mark.parametrize("name", SHARED)
def test_linen_fields_match_flax_names_defaults_and_order(name):
    ours = _linen_fields(getattr(jl, name))
    theirs = _linen_fields(getattr(fnn, name))
    assert [n for n, _ in ours] == [n for n, _ in theirs] + EXTRAS.get(name, [])
    for (field, our_default), (_, their_default) in zip(ours, theirs, strict=False):
        assert _same_default(field, our_default, their_default), field


@pytest.mark.parametrize("name", SHARED)
def test_nnx_constructor_matches_flax_names_kinds_defaults_and_order(name):
    ours = _nnx_parameters(getattr(jx, name))
    theirs = _nnx_parameters(getattr(nnx, name))
    assert [p.name for p in ours] == [p.name for p in theirs] + NNX_EXTRAS.get(name, [])
    for our, their in zip(ours, theirs, strict=False):
        assert our.kind == their.kind, our.name
        assert _same_default(our.name, our.default, their.default), our.name


def _linen_call(module_cls, x, **kwargs):
    module = module_cls(**kwargs)
    variables = module.init(jax.random.key(0), x)
    return module.apply(variables, x, mutable=["batch_stats"])[0]


CALLS = [
    ("BatchNorm", {"use_running_average": False, "use_fast_variance": True}, {}),
    ("LayerNorm", {"use_fast_variance": True}, {}),
    ("RMSNorm", {}, {}),
    ("GroupNorm", {"num_groups": 2, "use_fast_variance": True}, {}),
    ("InstanceNorm", {"use_fast_variance": True}, {}),
]


@pytest.mark.parametrize(("name", "kwargs", "_"), CALLS)
def test_every_module_computes_what_flax_computes_in_both_apis(name, kwargs, _):
    x = jax.random.normal(jax.random.key(1), (4, 3, 3, 6)) * 2 + 1
    expected = _linen_call(getattr(fnn, name), x, **kwargs)
    np.testing.assert_allclose(_linen_call(getattr(jl, name), x, **kwargs), expected,
                               rtol=1e-5, atol=1e-5)
    nnx_args = (6, 2) if name == "GroupNorm" else (6,)
    nnx_kwargs = {k: v for k, v in kwargs.items() if k != "num_groups"}
    ours = getattr(jx, name)(*nnx_args, rngs=nnx.Rngs(0), **nnx_kwargs)
    theirs = getattr(nnx, name)(*nnx_args, rngs=nnx.Rngs(0), **nnx_kwargs)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_every_public_class_runs_in_both_apis():
    x = jax.random.normal(jax.random.key(2), (2, 4, 4, 6))
    assert sorted(jl.__all__) == sorted(n for n in jx.__all__ if n != "recompute_batch_stats")
    for name in sorted(set(jl.__all__) - WRAPPERS):
        linen_cls, nnx_cls = getattr(jl, name), getattr(jx, name)
        if name == "AdaptiveInstanceNorm":
            a = linen_cls().apply({}, x, x[::-1])
            b = nnx_cls()(x, x[::-1])
        elif name == "LocalResponseNorm":
            a, b = linen_cls().apply({}, x), nnx_cls()(x)
        elif name == "AddAndNorm":
            module = linen_cls()
            a = module.apply(module.init(jax.random.key(0), x, x[::-1]), x, x[::-1])
            b = nnx_cls(6, rngs=nnx.Rngs(0))(x, x[::-1])
        elif name == "ConditionalInstanceNorm":
            ids = jnp.array([0, 2])
            module = linen_cls(num_styles=3)
            a = module.apply(module.init(jax.random.key(0), x, ids), x, ids)
            b = nnx_cls(6, 3, rngs=nnx.Rngs(0))(x, ids)
        else:
            group = {"num_groups": 3} if name == "GroupNorm" else {}
            kwargs = {"use_running_average": False} if name.startswith("Batch") else {}
            a = _linen_call(linen_cls, x, **group, **kwargs)
            b = nnx_cls(6, *group.values(), rngs=nnx.Rngs(0), **kwargs)(x)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=name)
