"""Numerical stability of the variance in float32 when |mean| >> std.

Run: ``python benchmarks/stability.py``. For LayerNorm and BatchNorm (training mode) on
float32 data ``offset + N(0, 1)``, prints the largest absolute error of the normalized output
against a float64 two-pass reference computed from the same float32-rounded input, for
jaxnorm and for ``flax.linen`` with its default ``use_fast_variance=True`` (the one-pass
``E[x²] - E[x]²``) and with ``use_fast_variance=False``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm

RATIOS = (1e2, 1e3, 1e4, 1e5)  # |mean| / std, with std = 1
LAYER_NORM_SHAPE = (64, 1024)  # statistics over the last axis
BATCH_NORM_SHAPE = (4096, 64)  # statistics over the batch axis
LAYER_NORM_EPS = 1e-6  # flax.linen.LayerNorm's default
BATCH_NORM_EPS = 1e-5  # flax.linen.BatchNorm's default


def reference_normalize(x: np.ndarray, axis: int, eps: float) -> np.ndarray:
    """Two-pass normalization in float64."""
    x = x.astype(np.float64)
    mean = x.mean(axis=axis, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axis, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def flax_layer_norm(x: jax.Array, use_fast_variance: bool) -> jax.Array:
    module = nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=use_fast_variance)
    return module.apply(module.init(jax.random.key(0), x), x)


def flax_batch_norm(x: jax.Array, use_fast_variance: bool) -> jax.Array:
    module = nn.BatchNorm(
        use_running_average=False, epsilon=BATCH_NORM_EPS, use_fast_variance=use_fast_variance
    )
    variables = module.init(jax.random.key(0), x)
    y, _ = module.apply(variables, x, mutable=["batch_stats"])
    return y


IMPLEMENTATIONS = {
    "LayerNorm": {
        "jaxnorm": lambda x: jaxnorm.layer_norm(x, eps=LAYER_NORM_EPS),
        "flax default (fast variance)": lambda x: flax_layer_norm(x, True),
        "flax use_fast_variance=False": lambda x: flax_layer_norm(x, False),
    },
    "BatchNorm": {
        "jaxnorm": lambda x: jaxnorm.batch_norm(x, eps=BATCH_NORM_EPS)[0],
        "flax default (fast variance)": lambda x: flax_batch_norm(x, True),
        "flax use_fast_variance=False": lambda x: flax_batch_norm(x, False),
    },
}
SETUPS = {
    "LayerNorm": (LAYER_NORM_SHAPE, -1, LAYER_NORM_EPS),
    "BatchNorm": (BATCH_NORM_SHAPE, 0, BATCH_NORM_EPS),
}


def max_errors(layer: str, ratio: float, seed: int = 0) -> dict[str, float]:
    """Largest absolute output error of every implementation of ``layer`` at ``ratio``."""
    shape, axis, eps = SETUPS[layer]
    x = (ratio + np.random.default_rng(seed).normal(size=shape)).astype(np.float32)
    expected = reference_normalize(x, axis, eps)
    return {
        name: float(np.max(np.abs(np.asarray(jax.jit(fn)(jnp.asarray(x)), np.float64) - expected)))
        for name, fn in IMPLEMENTATIONS[layer].items()
    }


def main() -> None:
    names = list(IMPLEMENTATIONS["LayerNorm"])
    print("Max |y - y_float64| of float32 normalization of offset + N(0, 1)\n")
    print("| layer | mean/std | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for layer in IMPLEMENTATIONS:
        for ratio in RATIOS:
            errors = max_errors(layer, ratio)
            cells = " | ".join(f"{errors[name]:.3g}" for name in names)
            print(f"| {layer} | {ratio:.0e} | {cells} |")
    print(
        f"\nLayerNorm: {LAYER_NORM_SHAPE} over the last axis, eps={LAYER_NORM_EPS}; "
        f"BatchNorm: {BATCH_NORM_SHAPE} over the batch axis, eps={BATCH_NORM_EPS}. "
        f"jax {jax.__version__}, backend {jax.default_backend()}."
    )


if __name__ == "__main__":
    main()
