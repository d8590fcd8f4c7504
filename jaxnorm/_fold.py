r"""Folding an evaluation-mode BatchNorm into the preceding Conv or Dense layer."""

from __future__ import annotations

import jax

from jaxnorm._affine import affine_coefficients
from jaxnorm._axes import canonicalize_axes, check_eps, check_floating, check_shape
from jaxnorm._stats import statistics_dtype


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

    Args:
      kernel: the layer's kernel (Dense ``(in, out)``, Conv ``(*window, in, out)``).
      bias: the layer's bias of shape ``(out,)``, or None for a layer without bias.
      mean: BatchNorm's running mean, shape ``(out,)``.
      var: BatchNorm's running variance, shape ``(out,)``.
      scale: BatchNorm's :math:`\gamma` (None: 1).
      bn_bias: BatchNorm's :math:`\beta` (None: 0).
      eps: BatchNorm's :math:`\epsilon`.
      output_axis: the kernel's output-feature axis.

    Returns:
      ``(kernel', bias')`` for the same layer type, with ``bias'`` of shape ``(out,)``.
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
    # BN(layer(x)) = (x·W + b)·a + (β - μ a), so W' = W a and b' = b a + (β - μ a)
    multiplier, offset = affine_coefficients(mean, var, scale, bn_bias, eps, compute)
    broadcast = [1] * kernel.ndim
    broadcast[axis] = features[0]
    folded_kernel = kernel.astype(compute) * multiplier.reshape(broadcast)
    folded_bias = offset if bias is None else bias.astype(compute) * multiplier + offset
    return folded_kernel.astype(kernel.dtype), folded_bias.astype(kernel.dtype)
