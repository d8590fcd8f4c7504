r"""Moments: stable, mask-aware, count-weighted across devices.

The one place in jaxnorm where statistics are computed. For a reduction set :math:`S`
with weights :math:`w_i \in \{0, 1\}` (the mask), :math:`n = \sum_S w_i`,

.. math::
    \mu = \frac{1}{n}\sum_S w_i x_i,\qquad
    \sigma^2 = \frac{1}{n}\sum_S w_i (x_i - \mu)^2,

the two-pass statistics, with the mean refined by a correction pass where it matters
(:func:`_refined_two_pass`), so a constant set gives exactly :math:`\mu = x`,
:math:`\sigma^2 = 0` (and a normalized output of exactly ``bias``). No
:math:`E[x^2]-E[x]^2` cancellation (Chan, Golub & LeVeque 1983);
:func:`_local_moments` explains how this costs one pass where it matters.

Across a mapped axis (``axis_name``) the members agree on a pivot from the data (``pmax``),
each computes these statistics of its own ``x - pivot``, and :func:`_combine_across` merges
them with Chan et al.'s parallel formula: the result is
the statistics of the concatenated batch, stable however far apart the members' data lie,
and exact when members hold different numbers of unmasked elements.
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


def element_count(
    shape: tuple[int, ...], axes: tuple[int, ...], mask: jax.Array | None, dtype: Any
) -> jax.Array:
    """The number of counted elements in each reduction set: a scalar without a mask, else
    the mask's sums over ``axes`` (keepdims); 0 for a fully masked set."""
    if mask is None:
        return jnp.asarray(math.prod(shape[a] for a in axes), dtype)
    return jnp.sum(mask, axis=axes, keepdims=True, dtype=dtype)


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


def _refined_two_pass(
    x: jax.Array, mean: jax.Array, axes: tuple[int, ...], mask: jax.Array | None, count: jax.Array
) -> tuple[jax.Array, jax.Array]:
    r"""The mean refined by one correction pass, :math:`\mu = m + \frac1n\sum w_i (x_i - m)`
    (which removes the rounding of the first-pass mean :math:`m`, so a constant set gets
    exactly :math:`\mu = x` and a normalized output of exactly ``bias``), then
    :math:`\sigma^2 = \frac1n\sum w_i (x_i - \mu)^2`."""
    deviation = x - mean
    if mask is not None:
        deviation = jnp.where(mask, deviation, 0)
    mean = mean + jnp.sum(deviation, axis=axes, keepdims=True) / count
    return mean, _centred_mean_square(x, mean, axes, mask, count)


def _local_moments(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None,
    fast_variance: bool = False,
    refine_mean: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""``(mean, var, count)`` on one device (keepdims), with two-pass accuracy.

    When a reduction set is contiguous in memory (the minor axes: LayerNorm) XLA fuses
    the passes and the normalization into one loop over each row in cache, so the two-pass
    variance costs no more than one pass; for float32/float64 inputs the mean is refined
    by one more pass (:func:`_refined_two_pass`: exact for constant rows). When the set is
    strided (BatchNorm, InstanceNorm, GroupNorm) each pass is a sweep over ``x`` that must
    wait for the previous one. There, :math:`E[x]` and :math:`E[x^2]` are summed in one
    sweep and :math:`\sigma^2 = E[x^2] - \mu^2` is kept when every set has :math:`\mu^2
    \le 16 \sigma^2`: the formula's rounding error is :math:`(E[x^2]/\sigma^2)\,\delta
    \le 17\,\delta` for a relative error :math:`\delta` of the sums, against
    :math:`\delta` for two passes. Otherwise (the cancellation case: large offsets,
    constant inputs) ``lax.cond`` runs the refined two passes. Measurements in
    ``benchmarks/RESULTS.md``.
    ``fast_variance`` keeps :math:`E[x^2] - \mu^2` unconditionally (Flax's fast variance).
    """
    count = element_count(x.shape, axes, mask, x.dtype)
    safe_count = jnp.maximum(count, 1)
    weighted = x if mask is None else jnp.where(mask, x, 0)
    mean = jnp.sum(weighted, axis=axes, keepdims=True) / safe_count
    if axes == tuple(range(x.ndim - len(axes), x.ndim)) and not fast_variance:
        if refine_mean:
            mean, var = _refined_two_pass(x, mean, axes, mask, safe_count)
        else:
            var = _centred_mean_square(x, mean, axes, mask, safe_count)
        return mean, var, count
    # masked positions reach no sum (0 * NaN would be NaN)
    mean_square = jnp.sum(weighted * weighted, axis=axes, keepdims=True) / safe_count
    one_pass = jnp.maximum(mean_square - mean * mean, 0)
    if fast_variance:
        return mean, one_pass, count
    well_conditioned = jnp.all(mean * mean <= ONE_PASS_CONDITION_LIMIT * one_pass)
    mean, var = lax.cond(
        well_conditioned,
        lambda x, mask, mean, one_pass: (mean, one_pass),
        lambda x, mask, mean, one_pass: _refined_two_pass(x, mean, axes, mask, safe_count),
        x,
        mask,
        mean,
        one_pass,
    )
    return mean, var, count


def _agreed_pivot(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None,
    axis_name: Any,
    axis_index_groups: Any,
) -> jax.Array:
    r"""A data value every member agrees on (keepdims, no gradient): the largest of the
    members' first elements (under a mask: of their largest counted elements); 0 when
    nothing is counted anywhere. Statistics of ``x - pivot`` keep full precision in the
    members' offsets however large :math:`|\mu|/\sigma`."""
    if mask is None:
        first = tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim))
        pivot = x[first]
    else:
        pivot = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axes, keepdims=True)
    # stop_gradient first: pmax has no differentiation rule (the statistics do not depend
    # on the pivot mathematically)
    pivot = lax.pmax(lax.stop_gradient(pivot), axis_name, axis_index_groups=axis_index_groups)
    return lax.stop_gradient(jnp.where(jnp.isfinite(pivot), pivot, 0))


def _combine_across(
    mean: jax.Array,
    var: jax.Array,
    count: jax.Array,
    axis_name: Any,
    axis_index_groups: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""The statistics of the concatenated batch from each member's ``(mean, var, count)``
    (Chan et al. 1979), with :math:`N = \sum_d n_d`:

    .. math::
        \mu = \frac1N \sum_d n_d \mu_d,\qquad
        \sigma^2 = \frac1N \sum_d n_d \big(\sigma_d^2 + (\mu_d - \mu)^2\big).

    No cancellation, exact for unequal counts (members with nothing counted add nothing).
    Two small collectives on statistics-sized arrays.
    """
    count = jnp.broadcast_to(count, mean.shape)
    total, weighted = lax.psum((count, count * mean), axis_name, axis_index_groups=axis_index_groups)
    safe_total = jnp.maximum(total, 1)
    global_mean = weighted / safe_total
    spread = jnp.where(count > 0, count * (var + jnp.square(mean - global_mean)), 0)
    global_var = lax.psum(spread, axis_name, axis_index_groups=axis_index_groups) / safe_total
    return global_mean, global_var, total


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
        masked reduction set gives mean = 0, var = 0 (finite, never NaN).
      axis_name: combine with the other members of this mapped axis (pmap, shard_map,
        vmap), weighted by their element counts.
      axis_index_groups: optional groups within ``axis_name`` (as in ``lax.psum``).
      keepdims: keep the reduced axes with size one.
      centered: if False, return mean = 0 and var = :math:`E[x^2]` (RMSNorm's statistic).
      fast_variance: use the textbook one-pass :math:`E[x^2] - \mu^2` as Flax's
        ``use_fast_variance=True`` does: no conditioning check, no correction; it loses all
        accuracy when :math:`|\mu| \gg \sigma`. Off by default.

    Returns:
      ``(mean, var)`` with the population (biased) variance.
    """
    mean, var, _ = moments_and_count(
        x, axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups,
        centered=centered, fast_variance=fast_variance,
    )
    if not keepdims:
        axes = canonicalize_axes(axes, mean.ndim, "axes")
        mean = jnp.squeeze(mean, axes)
        var = jnp.squeeze(var, axes)
    return mean, var


def moments_and_count(
    x: jax.Array, axes: Axes, *, mask: jax.Array | None = None, axis_name: Any = None,
    axis_index_groups: Any = None, centered: bool = True, fast_variance: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`moments` (keepdims) with the number of counted elements of each set, summed
    over ``axis_name``: what the dispatcher needs to give fully masked sets ``bias``."""
    x = check_floating(x, allow_complex=True)
    input_dtype = x.dtype
    axes = canonicalize_axes(axes, x.ndim, "axes")
    mask = broadcast_mask(mask, x.shape)
    x = x.astype(statistics_dtype(x.dtype))
    if jnp.iscomplexobj(x):
        return _complex_moments(x, axes, mask, axis_name, axis_index_groups)
    if centered and not fast_variance:
        # Half-precision values summed in float32 are exact multiples (a constant set of up
        # to 2**13 float16 / 2**16 bfloat16 values has an exact sum), so their first-pass
        # mean is already exact for constant sets; only wider inputs need the refinement.
        refine = jnp.dtype(input_dtype).itemsize >= 4
        return _stable_moments(x, axes, mask, axis_name, axis_index_groups, refine)
    if centered and axis_name is None:
        return _local_moments(x, axes, mask, fast_variance=True)
    return _summed_moments(x, axes, mask, axis_name, axis_index_groups, centered)


def _stable_moments(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None,
    axis_name: Any,
    axis_index_groups: Any,
    refine_mean: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Two-pass-accurate moments (keepdims); across ``axis_name``, each member's statistics
    of ``x - pivot`` (a shared data value) merged with Chan's formula: the members' offsets
    from each other keep full precision, and a constant input (pivot = the constant) stays
    exact."""
    if axis_name is None:
        return _local_moments(x, axes, mask, refine_mean=refine_mean)
    pivot = _agreed_pivot(x, axes, mask, axis_name, axis_index_groups)
    mean, var, count = _local_moments(x - pivot, axes, mask)
    mean, var, total = _combine_across(mean, var, count, axis_name, axis_index_groups)
    return mean + pivot, var, total


def _summed_moments(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None,
    axis_name: Any,
    axis_index_groups: Any,
    centered: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r""":math:`E[x]` and :math:`E[x^2]` summed (with one ``psum`` across members), keepdims:
    RMSNorm's statistic (``centered=False``: mean 0, var :math:`E[x^2]`) and Flax's fast
    variance :math:`E[x^2] - \mu^2`."""
    weighted = x if mask is None else jnp.where(mask, x, 0)
    count = element_count(x.shape, axes, mask, x.dtype)
    first = jnp.sum(weighted, axis=axes, keepdims=True)
    second = jnp.sum(weighted * weighted, axis=axes, keepdims=True)
    if axis_name is not None:
        count, first, second = lax.psum(
            (count, first, second), axis_name, axis_index_groups=axis_index_groups
        )
    safe_count = jnp.maximum(count, 1)
    if not centered:
        return jnp.zeros_like(second), second / safe_count, count
    mean = first / safe_count
    return mean, jnp.maximum(second / safe_count - mean * mean, 0), count


def _complex_moments(
    x: jax.Array,
    axes: tuple[int, ...],
    mask: jax.Array | None,
    axis_name: Any,
    axis_index_groups: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Complex input, as Flax: the complex mean and the real variance
    :math:`\frac1n\sum w\,|x - \mu|^2`, two passes (each one ``psum`` across members)."""
    weighted = x if mask is None else jnp.where(mask, x, 0)
    count = jnp.broadcast_to(element_count(x.shape, axes, mask, x.real.dtype),
                             jnp.sum(weighted, axis=axes, keepdims=True).shape)
    total = jnp.sum(weighted, axis=axes, keepdims=True)
    if axis_name is not None:
        count, total = lax.psum((count, total), axis_name, axis_index_groups=axis_index_groups)
    mean = total / jnp.maximum(count, 1)
    deviation = x - mean
    if mask is not None:
        deviation = jnp.where(mask, deviation, 0)
    spread = jnp.sum(deviation.real**2 + deviation.imag**2, axis=axes, keepdims=True)
    if axis_name is not None:
        spread = lax.psum(spread, axis_name, axis_index_groups=axis_index_groups)
    return mean, spread / jnp.maximum(count, 1), count
