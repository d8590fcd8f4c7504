r"""Normalization with its statistics, and the closed-form backward pass.

The hot path of every variant: :math:`\mu, \sigma^2` from :func:`jaxnorm.moments`, then
:math:`y = \hat x \gamma + \beta` with :math:`\hat x = (x - \mu)\,r`,
:math:`r = (\sigma^2 + \epsilon)^{-1/2}`. Automatic differentiation of that graph keeps the
cotangents of every intermediate; the backward pass written out instead saves only
:math:`x`, :math:`\mu` and :math:`r` and computes, per reduction set :math:`S` of
:math:`n` (unmasked) elements with weights :math:`w_i` (the mask),

.. math::
    g = \bar y\,\gamma,\qquad
    \bar x = r\Big(g - \frac{w}{n}\big(\textstyle\sum_S g
                 + \hat x \sum_S g \hat x\big)\Big)
             + \frac{w}{n}\big(\bar\mu + 2 (x - \mu)\,\overline{\sigma^2}\big),

:math:`\bar\gamma = \sum \bar y \hat x`, :math:`\bar\beta = \sum \bar y` over the axes that
do not carry :math:`\gamma, \beta` (Ioffe & Szegedy 2015, section 3). Without centring (RMS
normalization) :math:`\mu = 0` and the :math:`\sum g` term drops. Masked-out elements
are normalized too, so the sums run over all of :math:`S`; only :math:`\partial\mu/\partial
x_i = w_i/n` carries the mask. :math:`\bar\mu,
\overline{\sigma^2}` are the cotangents of the returned statistics (BatchNorm returns them).
The backward pass is plain ``jax.numpy``, so it can itself be differentiated (reverse over
reverse); forward-mode differentiation goes through the unfused path.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm.stats import moments, statistics_dtype

Array = jax.Array


def _sum_to_shape(value: Array, shape: tuple[int, ...]) -> Array:
    """Sums a broadcast ``value`` back to ``shape`` (the transpose of broadcasting)."""
    axes = tuple(a for a, size in enumerate(shape) if size == 1 and value.shape[a] != 1)
    return jnp.sum(value, axis=axes, keepdims=True).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def normalize_with_statistics(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    mask: Array | None,
    reduction: tuple[int, ...],
    eps: float,
    dtype: Any,
    centered: bool,
) -> tuple[Array, Array, Array]:
    r"""``(y, mean, var)``: ``x`` normalized over ``reduction`` with its own statistics.

    ``scale``/``bias`` are already broadcastable to ``x`` (or None); ``mean``/``var`` keep
    the reduced axes and are in at least float32; ``y`` is in ``dtype``.
    """
    return _forward(x, scale, bias, mask, reduction, eps, dtype, centered)[0]


def _forward(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    mask: Array | None,
    reduction: tuple[int, ...],
    eps: float,
    dtype: Any,
    centered: bool,
) -> tuple[tuple[Array, Array, Array], tuple[Any, ...]]:
    mean, var = moments(x, reduction, mask=mask, keepdims=True, centered=centered)
    compute = statistics_dtype(jnp.promote_types(x.dtype, dtype))
    rstd = lax.rsqrt(var.astype(compute) + jnp.asarray(eps, compute))
    multiplier = rstd if scale is None else rstd * scale.astype(compute)
    y = x.astype(compute)
    if centered:
        y = y - mean.astype(compute)
    y = y * multiplier
    if bias is not None:
        y = y + bias.astype(compute)
    residuals = (x, scale, bias, mask, mean, rstd)
    return (y.astype(dtype), mean, var), residuals


def _backward(
    reduction: tuple[int, ...],
    eps: float,
    dtype: Any,
    centered: bool,
    residuals: tuple[Any, ...],
    cotangents: tuple[Array, Array, Array],
) -> tuple[Array, Array | None, Array | None, None]:
    del eps, dtype
    x, scale, bias, mask, mean, rstd = residuals
    dy, dmean, dvar = cotangents
    compute = rstd.dtype
    parameter = scale if scale is not None else bias
    # Reduction axes that carry no parameters: all of them for BatchNorm and InstanceNorm,
    # the spatial ones for GroupNorm, none for LayerNorm and RMSNorm.
    outer = tuple(a for a in reduction if parameter is None or parameter.shape[a] == 1)
    inner = tuple(a for a in reduction if a not in outer)
    views = ((x, mean, rstd, dy, scale),) * 3
    if not outer:
        # XLA:CPU stores any value that several fusions share (x̂, broadcasts of r and γ)
        # as a full-size array. Here each group of consumers gets its own barrier-separated
        # view of the residuals, so that each fusion recomputes x̂ from x as it streams it.
        # (With parameter-free axes there are only two groups, and the barrier would make
        # XLA copy reshaped half-precision inputs instead: measured slower for GroupNorm.)
        views = lax.optimization_barrier(views)
    sums_view, dx_view, parameters_view = views

    def normalized(view: tuple[Any, ...]) -> tuple[Array, Array, Array, Array | None, Array]:
        x, mean, rstd, dy, scale = view
        centred_x = x.astype(compute) - mean.astype(compute) if centered else x.astype(compute)
        scale = None if scale is None else scale.astype(compute)
        return centred_x, centred_x * rstd, dy.astype(compute), scale, rstd

    _, x_hat, dy_, scale_c, _ = normalized(sums_view)
    # Reduce first over the parameter-free axes: those partial sums of dy·x̂ and dy give the
    # parameter gradients and, times the scale and summed over the remaining reduction
    # axes, the sums the statistics need; x is read once for both.
    need_total = centered or bias is not None
    if outer:
        dy_x_hat = jnp.sum(dy_ * x_hat, axis=outer, keepdims=True)
        dy_sum = jnp.sum(dy_, axis=outer, keepdims=True) if need_total else None
        dscale = None if scale is None else _sum_to_shape(dy_x_hat, scale.shape)
        dbias = None if bias is None else _sum_to_shape(dy_sum, bias.shape)
        correlation = dy_x_hat if scale is None else dy_x_hat * scale_c
        correlation = jnp.sum(correlation, axis=inner, keepdims=True)
        total = None
        if centered:
            total = dy_sum if scale is None else dy_sum * scale_c
            total = jnp.sum(total, axis=inner, keepdims=True)
    else:
        g = dy_ if scale is None else dy_ * scale_c
        correlation = jnp.sum(g * x_hat, axis=reduction, keepdims=True)
        total = jnp.sum(g, axis=reduction, keepdims=True) if centered else None
        _, x_hat_p, dy_p, _, _ = normalized(parameters_view)
        dscale = None if scale is None else _sum_to_shape(dy_p * x_hat_p, scale.shape)
        dbias = None if bias is None else _sum_to_shape(dy_p, bias.shape)
    centred_x, x_hat, dy, scale_c, rstd = normalized(dx_view)
    g = dy if scale is None else dy * scale_c
    if mask is None:
        count = jnp.asarray(math.prod(x.shape[a] for a in reduction), compute)
    else:
        count = jnp.maximum(jnp.sum(mask, axis=reduction, keepdims=True, dtype=compute), 1)
    correction = x_hat * correlation
    statistics_term = 2 * dvar.astype(compute) * centred_x
    if centered:
        correction = correction + total
        statistics_term = statistics_term + dmean.astype(compute)
    through_statistics = statistics_term / count - (rstd / count) * correction
    if mask is not None:
        through_statistics = jnp.where(mask, through_statistics, 0)
    dx = (rstd * g + through_statistics).astype(x.dtype)
    if dscale is not None:
        dscale = dscale.astype(scale.dtype)
    if dbias is not None:
        dbias = dbias.astype(bias.dtype)
    return dx, dscale, dbias, None


normalize_with_statistics.defvjp(_forward, _backward)
