r"""Moments: stable, mask-aware, count-weighted across devices.

The one place in jaxnorm where statistics are computed. For a reduction set :math:`S`
with weights :math:`w_i \in \{0, 1\}` (the mask),

.. math::
    n = \sum_{i \in S} w_i,\quad
    \mu = s + \frac{1}{n}\sum w_i (x_i - s),\quad
    \sigma^2 = \frac{1}{n}\sum w_i (x_i - s)^2 - (\mu - s)^2,

where the shift :math:`s` is one element of the data (the first one, or the largest
unmasked one under a mask). Shifting by a value near the mean removes the cancellation of
the textbook :math:`E[x^2]-E[x]^2` (Chan, Golub & LeVeque 1983) while both sums still fuse
into a single pass over ``x``; a constant input gives exactly zero variance. That is the
cross-device path (one collective for all sums). On one device the statistics have the
accuracy of the two-pass formula at the cost of one pass (see :func:`_local_moments`).

Across a mapped axis the shift is agreed first (``pmax``), then the sums and counts are
added (``psum``): the result is the statistics of the concatenated batch, exact when
devices hold different numbers of unmasked elements.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._axes import Axes, broadcast_mask, canonicalize_axes, check_floating


def statistics_dtype(dtype: Any) -> jnp.dtype:
    """At least float32: half precision inputs reduce in float32, float64 stays float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _shift(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None,
    axis_name: Any,
    axis_index_groups: Any,
) -> jax.Array:
    """A data value near the mean of each reduction set (keepdims), without gradient."""
    if mask is None:
        first = tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim))
        shift = x[first]
    else:
        shift = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axes, keepdims=True)
    if axis_name is not None:
        # stop_gradient first: pmax has no differentiation rule
        shift = lax.pmax(lax.stop_gradient(shift), axis_name, axis_index_groups=axis_index_groups)
    if mask is not None:
        shift = jnp.where(jnp.isfinite(shift), shift, 0)
    return lax.stop_gradient(shift)


# Largest mean² / var for which the one-pass variance is used locally: its rounding error
# is then at most (1 + this) times that of the two-pass formula's (see _local_moments).
ONE_PASS_CONDITION_LIMIT = 16.0


def _centred_mean_square(
    x: jax.Array, mean: jax.Array, axes: tuple[int, ...], mask: jax.Array | None, count: jax.Array
) -> jax.Array:
    r""":math:`\frac1n\sum w_i (x_i - \mu)^2`, the second pass of the two-pass variance."""
    deviation = x - mean
    if mask is not None:
        deviation = jnp.where(mask, deviation, 0)
    return jnp.sum(deviation * deviation, axis=axes, keepdims=True) / count


def _local_moments(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None,
    keepdims: bool,
    fast_variance: bool = False,
) -> tuple[jax.Array, jax.Array]:
    r"""Statistics on one device with the accuracy of the two-pass variance.

    :math:`\mu = \frac1n\sum w_i x_i` and :math:`\sigma^2 = \frac1n\sum w_i (x_i -
    \mu)^2` (two passes), exact to rounding however large :math:`|\mu|/\sigma`.

    When a reduction set is contiguous in memory (the minor axes: LayerNorm, RMSNorm) XLA
    fuses both passes and the normalization into one loop whose second read hits cache, so
    the two passes cost no more than one. When it is strided (BatchNorm, InstanceNorm,
    GroupNorm) the second pass is a second sweep over ``x`` that must wait for the first.
    There, :math:`E[x^2]` is summed in the same sweep as :math:`E[x]` and
    :math:`\sigma^2 = E[x^2] - \mu^2` is kept when every set has :math:`\mu^2 \le 16
    \sigma^2`: the formula's rounding error is :math:`(E[x^2]/\sigma^2)\,\delta \le 17\,\delta`
    for a relative error :math:`\delta` of the sums, against :math:`\delta` for two passes.
    Otherwise (the cancellation case: large offsets, constant inputs) ``lax.cond`` runs the
    second pass. Measurements in ``benchmarks/RESULTS.md``. ``fast_variance`` keeps
    :math:`E[x^2] - \mu^2` unconditionally (Flax's fast variance).
    """
    weighted = x if mask is None else jnp.where(mask, x, 0)
    if mask is None:
        count = jnp.asarray(math.prod(x.shape[a] for a in axes), x.dtype)
    else:
        count = jnp.maximum(jnp.sum(mask, axis=axes, keepdims=True, dtype=x.dtype), 1)
    mean = jnp.sum(weighted, axis=axes, keepdims=True) / count
    if axes == tuple(range(x.ndim - len(axes), x.ndim)) and not fast_variance:
        var = _centred_mean_square(x, mean, axes, mask, count)
    elif fast_variance:
        mean_square = jnp.sum(weighted * x, axis=axes, keepdims=True) / count
        var = jnp.maximum(mean_square - mean * mean, 0)
    else:
        mean_square = jnp.sum(weighted * x, axis=axes, keepdims=True) / count
        one_pass = jnp.maximum(mean_square - mean * mean, 0)
        well_conditioned = jnp.max(mean * mean - ONE_PASS_CONDITION_LIMIT * one_pass) <= 0
        var = lax.cond(
            well_conditioned,
            lambda x, mean, mask, one_pass: one_pass,
            lambda x, mean, mask, one_pass: _centred_mean_square(x, mean, axes, mask, count),
            x,
            mean,
            mask,
            one_pass,
        )
    if not keepdims:
        mean = jnp.squeeze(mean, axes)
        var = jnp.squeeze(var, axes)
    return mean, var


def moments(
    x: jax.Array,
    axes: Axes,
    *,
    mask: jax.Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    keepdims: bool = False,
    centered: bool = True,
    fast_variance: bool = False,
) -> tuple[jax.Array, jax.Array]:
    r"""Mean and biased variance of ``x`` over ``axes``, in at least float32.

    Args:
      x: floating input.
      axes: the reduction axes.
      mask: boolean, broadcastable to ``x``; ``False`` elements do not count. A fully
        masked reduction set gives mean = its shift, var = 0 (finite, never NaN).
      axis_name: combine with the other members of this mapped axis (pmap, shard_map,
        vmap), weighted by their element counts.
      axis_index_groups: optional groups within ``axis_name`` (as in ``lax.psum``).
      keepdims: keep the reduced axes with size one.
      centered: if False, return mean = 0 and var = :math:`E[x^2]` (RMSNorm's statistic).
      fast_variance: use the textbook one-pass :math:`E[x^2] - \mu^2` as Flax's
        ``use_fast_variance=True`` does: no conditioning check, no shift; it loses all
        accuracy when :math:`|\mu| \gg \sigma`. Off by default.

    Returns:
      ``(mean, var)`` with the population (biased) variance.
    """
    x = check_floating(x)
    axes = canonicalize_axes(axes, x.ndim, "axes")
    mask = broadcast_mask(mask, x.shape)
    x = x.astype(statistics_dtype(x.dtype))

    if centered and axis_name is None:
        return _local_moments(x, axes, mask, keepdims, fast_variance)
    shift = None
    deviation = x
    if centered and not fast_variance:
        shift = _shift(x, axes, mask, axis_name, axis_index_groups)
        deviation = x - shift
    if mask is None:
        count = jnp.asarray(math.prod(x.shape[a] for a in axes), x.dtype)
    else:
        deviation = jnp.where(mask, deviation, 0)
        count = jnp.sum(mask, axis=axes, keepdims=True, dtype=x.dtype)
    first = jnp.sum(deviation, axis=axes, keepdims=True)
    second = jnp.sum(deviation * deviation, axis=axes, keepdims=True)
    if axis_name is not None:
        count, first, second = lax.psum(
            (count, first, second), axis_name, axis_index_groups=axis_index_groups
        )

    safe_count = jnp.maximum(count, 1)
    mean_square = second / safe_count
    if centered:
        mean_deviation = first / safe_count
        mean = mean_deviation if shift is None else shift + mean_deviation
        var = jnp.maximum(mean_square - mean_deviation * mean_deviation, 0)
    else:
        mean = jnp.zeros_like(mean_square)
        var = mean_square
    if not keepdims:
        mean = jnp.squeeze(mean, axes)
        var = jnp.squeeze(var, axes)
    return mean, var
