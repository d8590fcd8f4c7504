r"""Folding an evaluation-mode BatchNorm into the preceding Conv or Dense layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._axes import canonicalize_axes, check_eps, check_floating, check_shape
from jaxnorm.stats import statistics_dtype


def fold_batch_norm(
    kernel: jax.Array,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None = None,
    bn_bias: jax.Array | None = None,
    *,
    eps: float = 1e-5,
    output_axis: int = -1,
) -> tuple[jax.Array, jax.Array]:
    r"""Kernel and bias of a layer such that ``layer'(x) == BN_eval(layer(x))``.

    With :math:`a = \gamma / \sqrt{\sigma^2 + \epsilon}`: :math:`W' = W \cdot a` along
    ``output_axis`` and :math:`b' = (b - \mu)\,a + \beta`. ``bias=None`` is a layer
    without bias (:math:`b = 0`). Returned in the kernel's dtype.
    """
    kernel = check_floating(kernel, "kernel")
    (axis,) = canonicalize_axes(output_axis, kernel.ndim, "output_axis")
    check_eps(eps)
    features = (kernel.shape[axis],)
    bias = check_shape(bias, features, "bias")
    mean = check_shape(mean, features, "mean")
    var = check_shape(var, features, "var")
    scale = check_shape(scale, features, "scale")
    bn_bias = check_shape(bn_bias, features, "bn_bias")
    compute = statistics_dtype(kernel.dtype)
    multiplier = lax.rsqrt(var.astype(compute) + jnp.asarray(eps, compute))
    if scale is not None:
        multiplier = multiplier * scale.astype(compute)
    broadcast = [1] * kernel.ndim
    broadcast[axis] = features[0]
    folded_kernel = kernel.astype(compute) * multiplier.reshape(broadcast)
    folded_bias = -mean.astype(compute)
    if bias is not None:
        folded_bias = folded_bias + bias.astype(compute)
    folded_bias = folded_bias * multiplier
    if bn_bias is not None:
        folded_bias = folded_bias + bn_bias.astype(compute)
    return folded_kernel.astype(kernel.dtype), folded_bias.astype(kernel.dtype)
