r"""Weight standardization (Qiao et al. 2019) as a pure function.

Each output channel's kernel slice is standardized over its input axes:

.. math:: \hat w = \frac{w - \mu}{\sqrt{\sigma^2 + \epsilon}},\qquad
   \mu = \frac1N\sum_{i\in I} w_i,\quad \sigma^2 = \frac1N\sum_{i\in I}(w_i-\mu)^2

(biased variance, :math:`N` the number of weights per output channel). Used with
GroupNorm in BiT (Kolesnikov et al. 2020) and as the base of NFNets' scaled WS; timm's
``StdConv2d`` computes the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._weight_axes import WeightAxes, check_epsilon, reduction_dtype, weight_axes

Array = jax.Array


def standardize_weight(
    kernel: Array,
    *,
    input_axes: WeightAxes | None = None,
    eps: float = 1e-6,
    dtype: jnp.dtype | None = None,
) -> Array:
    r"""The standardized kernel :math:`(w - \mu)/\sqrt{\sigma^2 + \epsilon}` per output
    channel, mean and (biased, two-pass) variance over ``input_axes``, in at least float32.

    Args:
      kernel: the weight, e.g. a Flax ``Conv`` kernel ``(*window, in, out)`` or a
        ``Dense`` kernel ``(in, out)``.
      input_axes: the axes to standardize over; default every axis but the last (Flax's
        layout). For a PyTorch weight ``(out, in, *window)`` pass ``(1, ..., ndim-1)``.
      eps: added to the variance (>= 0).
      dtype: the result dtype; default ``kernel``'s.

    Returns:
      The standardized kernel, shaped as ``kernel``.
    """
    kernel = jnp.asarray(kernel)
    check_epsilon(eps)
    if kernel.ndim < 1:
        raise ValueError("kernel must have at least 1 dimension")
    if input_axes is None:
        axes = tuple(range(kernel.ndim - 1))
    else:
        axes = weight_axes(input_axes, kernel.ndim, "input_axes")
    compute = reduction_dtype(kernel.dtype)
    w = kernel.astype(compute)
    centered = w - jnp.mean(w, axis=axes, keepdims=True)
    variance = jnp.mean(jnp.square(centered), axis=axes, keepdims=True)
    standardized = centered * lax.rsqrt(variance + jnp.asarray(eps, compute))
    return standardized.astype(kernel.dtype if dtype is None else dtype)
