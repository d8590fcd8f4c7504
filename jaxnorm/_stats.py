r"""Moments: stable, mask-aware, count-weighted across devices.

The one place in jaxnorm where statistics are computed. For a reduction set :math:`S`
with weights :math:`w_i \in \{0, 1\}` (the mask), :math:`n = \sum_S w_i`,

.. math::
    \mu = \frac{1}{n}\sum_S w_i x_i,\qquad
    \sigma^2 = \frac{1}{n}\sum_S w_i (x_i - \mu)^2.

Computed in one pass over the data as sums of :math:`d_i = x_i - p`, shifted by a pivot
:math:`p` taken from the set itself (its first element, or for large sets the median of
its first three, :func:`_set_pivots`):

.. math::
    \mu = p + \bar d,\qquad \sigma^2 = \overline{d^2} - \bar d^2 .

The shift removes the :math:`E[x^2]-E[x]^2` cancellation (Chan, Golub & LeVeque 1983):
the rounding error of :math:`\sigma^2` is :math:`(1 + (\mu - p)^2/\sigma^2)\,\delta` for a
relative error :math:`\delta` of the sums, and :math:`p` is a sample of the data, so
:math:`(\mu-p)^2/\sigma^2` is of order one however large :math:`|\mu|/\sigma`; and
:math:`x - p` is exact for :math:`x` near :math:`p` (Sterbenz). A constant set gives
:math:`d = 0`: exactly :math:`\mu = x`, :math:`\sigma^2 = 0` (so a normalized output of
exactly ``bias``). The arrangement is chosen per backend (:func:`local_moments`, with
``lax.platform_dependent``): on GPU the shifted single pass, no branch (LayerNorm rows:
three fused row reductions in one kernel; strided sets summed in two stages); on TPU one
variadic reduction that merges counts, means and centred squares pairwise (Chan et al.),
no pivot and no branch (GroupNorm's split view: a group pivot); on
CPU the in-cache refined rows and, for strided sets, a conditioned one-pass with a
``lax.cond`` fallback to two passes (:func:`_cpu_moments`). Under a mask the first
element may be masked out (and hold anything), so masked sets take two passes (the mean,
then the centred squares).

Across a mapped axis (``axis_name``) each member computes its own statistics so, one
``all_gather`` hands every member all members' :math:`(n, p, \bar d, \sigma^2)` and each
merges them exactly (Chan et al., :func:`merge_members`): the statistics of the
concatenated batch from the first step at any offset, exact for unequal (masked) counts.
Sets that span sharded axes under ``jit`` (:mod:`jaxnorm._sharding`) are merged the same
way from their shards' statistics (:func:`_sharded_moments`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from jaxnorm._axes import Axes, broadcast_mask, canonicalize_axes, check_floating
from jaxnorm._sharding import explicit_shards, spanned_shards


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


def _keepdims_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with the reduced ``axes`` of size one."""
    return tuple(1 if a in axes else n for a, n in enumerate(shape))


def _count_like(count: jax.Array, like: jax.Array) -> jax.Array:
    """``count`` broadcast to ``like``'s shape and (explicit) sharding, so that every
    backend's arrangement returns statistics of one type."""
    return count + jnp.zeros_like(like)


class ShiftedMoments(NamedTuple):
    """Statistics (keepdims) with their pivot: ``mean = pivot + offset``.

    Args:
      pivot: the shift :math:`p` (no gradient), or 0.
      offset: :math:`\\bar d`, the mean of ``x - pivot``.
      var: the biased variance.
      count: the number of counted elements (over every member).
    """

    pivot: jax.Array
    offset: jax.Array
    var: jax.Array
    count: jax.Array

    @property
    def mean(self) -> jax.Array:
        return self.pivot + self.offset


def _group_channels(ndim: int, axes: tuple[int, ...]) -> bool:
    """Whether the sets look like GroupNorm's ``(..., groups, channels per group)`` view:
    the minor axis reduced, the one before it kept, some axis before that reduced."""
    return ndim - 1 in axes and ndim - 2 not in axes and any(a < ndim - 2 for a in axes)


MEDIAN_PIVOT_MIN_SET = 1 << 16
"""Sets of at least this many values take the median of three as their pivot
(:func:`_set_pivots`); smaller ones their first element."""


def _set_pivots(x: jax.Array, axes: tuple[int, ...], median_from: int = MEDIAN_PIVOT_MIN_SET
                ) -> jax.Array:
    r"""A pivot for every reduction set (keepdims), sampled from the set, without gradient.

    The shifted sums' rounding error grows as :math:`(\mu - p)^2/\sigma^2`, which a
    single outlier as the pivot bounds only by the set's size :math:`n` (its own share of
    the variance): a first element 1000 standard deviations out cost 3.5 % of the
    variance of a set of 200 000. Sets of at least ``median_from`` values therefore take
    the median of their first three elements along their innermost reduction axis that
    has three, which a single outlier cannot be; smaller sets (error below
    :math:`n\delta`) keep their first element, which XLA:GPU fuses into each consumer
    where a median would be one more small kernel. A constant set's pivot is its value.
    GroupNorm's split channel view takes each group's first channel at the first
    position. No barrier: XLA fuses the slice into each consumer (a separate slice of a
    reshaped ``x`` is costed by XLA as a read of all of ``x``).

    Args:
      x: the input, unconverted.
      axes: the reduction axes.
      median_from: the smallest set that takes the median of three.
    """
    if any(x.shape[a] == 0 for a in axes):  # empty sets: any pivot, of the keepdims shape
        return jnp.zeros(_keepdims_shape(x.shape, axes), x.dtype)
    if _group_channels(x.ndim, axes):
        # slice the merged channel axis first (the array's own layout; a slice of the split
        # view is costed by XLA as a read of all of x), then each group's first channel
        return lax.stop_gradient(_group_first_channels(x, axes)[..., :1])
    inner = next((a for a in reversed(axes) if x.shape[a] >= 3), None)
    if math.prod(x.shape[a] for a in axes) < median_from:
        inner = None
    sample = x[tuple(slice(0, 3) if a == inner else slice(0, 1) if a in axes else slice(None)
                     for a in range(x.ndim))]
    if inner is None:
        return lax.stop_gradient(sample)
    a, b, c = (lax.slice_in_dim(sample, i, i + 1, axis=inner) for i in range(3))
    return lax.stop_gradient(jnp.maximum(jnp.minimum(a, b), jnp.minimum(jnp.maximum(a, b), c)))


def _shifted_sums(
    x: jax.Array, pivot: jax.Array, axes: tuple[int, ...], mask: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(n, sum d, sum d^2)`` of ``d = x - pivot`` over the counted elements, one pass."""
    d = x - pivot
    if mask is not None:
        d = jnp.where(mask, d, 0)
    count = _count_like(element_count(x.shape, axes, mask, x.dtype), pivot)
    return count, jnp.sum(d, axis=axes, keepdims=True), jnp.sum(d * d, axis=axes, keepdims=True)


# XLA:GPU splits a column reduction of more rows than this itself (tree reduction).
GPU_COLUMN_SPLIT_BOUND = 4096
# Outputs a column reduction needs for XLA:GPU to fuse ``x - pivot`` into it. 4096 (one
# H200 wave of its blocks) was too few: at exactly 4096 (InstanceNorm 32x64x64x128) XLA
# stored ``x - pivot`` full-size, costing 32 of 91 us on a real H200. With 16384 the
# compiled H200 graph of every strided case of the benchmark sweep and of 20 other shapes
# writes no x-sized array besides y and dx (benchmarks/RESULTS.md, structural checks);
# 8192 and 65536 each left some.
GPU_FUSING_OUTPUTS = 16384
# Fewest rows a chunk keeps: shorter chunks would leave the second stage a sum nearly as
# long as the set (and the split buys nothing on sets of few outputs and rows).
GPU_MIN_CHUNK_ROWS = 8


def gpu_chunks(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, int, int] | None:
    """How XLA:GPU should sum ``axes`` of an array of ``shape``: ``None`` for one reduce,
    else ``(lead, end, k)``: cut the leading run of reduction axes ``lead..end`` into
    ``k`` chunks. XLA:GPU sums up to 4096 rows of a column reduction in one kernel of one
    block per 32 outputs, and into a kernel of fewer blocks than multiprocessors it fuses
    no producer with a second operand (``x - pivot`` would be stored full-size); ``k`` is
    the smallest that gives ``GPU_FUSING_OUTPUTS`` outputs, so each chunk's sum fuses its
    producers."""
    if not axes:
        return None
    lead = end = axes[0]
    while end + 1 in axes:
        end += 1
    rows = math.prod(shape[lead:end + 1])
    outputs = math.prod(shape) // max(rows, 1)
    if rows > GPU_COLUMN_SPLIT_BOUND or outputs >= GPU_FUSING_OUTPUTS:
        return None
    chunks = next((k for k in range(2, rows // GPU_MIN_CHUNK_ROWS + 1)
                   if rows % k == 0 and outputs * k >= GPU_FUSING_OUTPUTS), None)
    return None if chunks is None else (lead, end, chunks)


def chunk_view(shape: tuple[int, ...], plan: tuple[int, int, int]) -> tuple[int, ...]:
    """``shape`` with the run ``lead..end`` of ``plan`` as ``(k, rows / k)``."""
    lead, end, chunks = plan
    return shape[:lead] + (chunks, math.prod(shape[lead:end + 1]) // chunks) + shape[end + 1:]


def _split_shifted_sums(x: jax.Array, pivot: jax.Array, axes: tuple[int, ...]
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """GPU: :func:`_shifted_sums` in two stages where one would store ``x - pivot``
    (:func:`gpu_chunks`): each chunk's sums with ``x - pivot`` fused, then, behind a
    barrier (which keeps XLA from merging the stages), their sum over the chunks and the
    other reduction axes."""
    plan = gpu_chunks(x.shape, axes)
    if plan is None or explicit_shards(x):  # a chunk view of a sharded array is undefined
        return _shifted_sums(x, pivot, axes, None)
    lead, end, _ = plan
    d = x.reshape(chunk_view(x.shape, plan)) - pivot.reshape(chunk_view(pivot.shape, (
        lead, end, 1)))
    partial = lax.optimization_barrier((jnp.sum(d, axis=lead + 1, keepdims=True),
                                        jnp.sum(d * d, axis=lead + 1, keepdims=True)))
    rest = (lead,) + tuple(a + lead - end + 1 for a in axes if a > end)
    zero = jnp.zeros((), x.dtype)
    first, second = lax.reduce(partial, (zero, zero),
                               lambda a, b: (a[0] + b[0], a[1] + b[1]), rest)
    count = _count_like(element_count(x.shape, axes, None, x.dtype), pivot)
    return count, first.reshape(pivot.shape), second.reshape(pivot.shape)


def _split_shifted(x: jax.Array, raw: jax.Array, axes: tuple[int, ...]) -> ShiftedMoments:
    """GPU's strided sets: the sampled pivot (:func:`_set_pivots`, sliced from ``raw``, the
    unconverted ``x``) and :func:`_split_shifted_sums`."""
    pivot = _set_pivots(raw, axes).astype(x.dtype)
    return _from_sums(pivot, *_split_shifted_sums(x, pivot, axes))


def _from_sums(pivot: jax.Array, count: jax.Array, first: jax.Array, second: jax.Array
               ) -> ShiftedMoments:
    safe_count = jnp.maximum(count, 1)
    offset = first / safe_count
    return ShiftedMoments(pivot, offset, jnp.maximum(second / safe_count - offset * offset, 0),
                          count)


def _two_pass(x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None) -> ShiftedMoments:
    """The mean, then the centred squares (masked sets: their first element may not
    count). ``pivot`` is the mean."""
    weighted = x if mask is None else jnp.where(mask, x, 0)
    count = element_count(x.shape, axes, mask, x.dtype)
    mean = jnp.sum(weighted, axis=axes, keepdims=True) / jnp.maximum(count, 1)
    _, offset_sum, spread = _shifted_sums(x, mean, axes, mask)
    count = _count_like(count, mean)
    return _from_sums(mean, count, offset_sum, spread)


# Largest mean² / var for which XLA:CPU keeps the unshifted one-pass variance: its rounding
# error is then at most 17 times that of two passes (see _cpu_moments).
ONE_PASS_CONDITION_LIMIT = 16.0


def _cpu_moments(x: jax.Array, axes: tuple[int, ...], raw: jax.Array | None = None
                 ) -> ShiftedMoments:
    r"""XLA:CPU's fastest accurate arrangement (measured, ``benchmarks/RESULTS.md``).
    Contiguous sets: the refined rows (:func:`_refined_rows`), in cache. Strided sets:
    :math:`E[x]` and :math:`E[x^2]` in one sweep, kept when every set has :math:`\mu^2 \le
    16\sigma^2` (rounding error at most :math:`17\delta`, against :math:`\delta` for two
    passes); otherwise (large offsets, constant sets, outliers) ``lax.cond`` runs the
    refined two passes, exact for constant sets. The branch converts ``raw`` (the
    unconverted ``x``) itself: a converted copy passed in would be stored full-size."""
    raw = x if raw is None else raw
    if axes == tuple(range(x.ndim - len(axes), x.ndim)):
        return _refined_rows(x, axes, _mean_correction(raw.dtype, x.shape, axes),
                             raw.dtype)
    count = element_count(x.shape, axes, None, x.dtype)
    safe_count = jnp.maximum(count, 1)  # empty sets: 0, not NaN
    mean = jnp.sum(x, axis=axes, keepdims=True) / safe_count
    var = jnp.maximum(jnp.sum(x * x, axis=axes, keepdims=True) / safe_count - mean * mean, 0)
    one_pass = ShiftedMoments(mean, jnp.zeros_like(mean), var,
                              _count_like(count, mean))
    well_conditioned = jnp.all(mean * mean <= ONE_PASS_CONDITION_LIMIT * var)
    return lax.cond(well_conditioned, lambda: one_pass,
                    lambda: _two_pass(raw.astype(x.dtype), axes, None))


def local_moments(x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None,
                  single_pass: bool = False) -> ShiftedMoments:
    """One device's statistics of a floating ``x`` (any precision; summed in at least
    float32), arranged per backend by ``lax.platform_dependent``; two passes under a mask.
    GPU: contiguous sets outside a derivative (``single_pass=False``) as refined rows in
    one kernel (:func:`_refined_rows`), others in the shifted single pass with a pivot
    sampled from each set (:func:`_set_pivots`), summed in two stages
    (:func:`_split_shifted`). TPU: one
    variadic reduction merging ``(n, mean, M2)`` (:func:`_merged_moments`); GroupNorm's
    split view a group pivot (:func:`_group_pivot_shifted`). CPU: :func:`_cpu_moments`.
    Pivots are sliced from ``x`` before its conversion, so no converted copy is made."""
    raw, x = x, x.astype(statistics_dtype(x.dtype))
    if mask is not None:
        return _two_pass(x, axes, mask)
    trailing = axes == tuple(range(x.ndim - len(axes), x.ndim))
    contiguous = trailing and not single_pass

    def shifted(x: jax.Array, raw: jax.Array) -> ShiftedMoments:
        return _pivot_shifted(x, raw, axes)

    def gpu(x: jax.Array, raw: jax.Array) -> ShiftedMoments:
        if contiguous:
            return _refined_rows(x, axes, _mean_correction(raw.dtype, x.shape, axes),
                             raw.dtype)
        return _split_shifted(x, raw, axes)

    def tpu(x: jax.Array, raw: jax.Array) -> ShiftedMoments:
        if _group_channels(x.ndim, axes):
            return _group_pivot_shifted(x, raw, axes)
        return _merged_moments(raw, axes)

    return lax.platform_dependent(
        x, raw, cpu=lambda x, raw: _cpu_moments(x, axes, raw), cuda=gpu, rocm=gpu, tpu=tpu,
        default=shifted,
    )


def _pivot_shifted(x: jax.Array, raw: jax.Array, axes: tuple[int, ...]) -> ShiftedMoments:
    """The shifted single pass with a pivot sampled from each set (:func:`_set_pivots`,
    sliced from ``raw``, the unconverted ``x``): one fused pass, no branch."""
    pivot = _set_pivots(raw, axes).astype(x.dtype)
    return _from_sums(pivot, *_shifted_sums(x, pivot, axes, None))


def _mean_correction(dtype: Any, shape: tuple[int, ...], axes: tuple[int, ...]) -> str:
    r"""How :func:`_refined_rows` makes a constant row's mean exact. XLA divides by
    :math:`n` as a multiplication by :math:`1/n` (and XLA:GPU's division is not correctly
    rounded either), so :math:`\sum x / n` of :math:`n` copies of :math:`c` may be a
    rounding off :math:`c`, which the output amplifies by :math:`1/\sqrt\epsilon`.

    - ``"none"``: half-precision rows of a power-of-two length up to 2**13 (float16) or
      2**16 (bfloat16): a constant row's float32 sum is exact (11 or 8 significant bits
      times at most 2**13 or 2**16, 24 in float32) and so is its product with :math:`1/n`.
    - ``"snap"``: other half-precision rows up to those lengths: a constant row's float32
      sum is exact, and a mean within :math:`2\epsilon_{32}|m|` of a value of the input's
      dtype is that value (:func:`_snapped_mean`).
    - ``"refine"``: longer or float32 rows: a second sum refines the mean.

    Without refinement XLA:GPU fuses the rows' statistics and output into one kernel also
    with half-precision parameters (with three row reductions it does not)."""
    if jnp.dtype(dtype).itemsize >= 4:
        return "refine"
    length = math.prod(shape[a] for a in axes)
    if length > 2 ** (24 - jnp.finfo(dtype).nmant - 1):
        return "refine"
    return "none" if length & (length - 1) == 0 else "snap"


def _snapped_mean(mean: jax.Array, dtype: Any) -> jax.Array:
    r"""``mean`` (float32) replaced by the nearest value of the half-precision ``dtype``
    where it lies within 2 float32 roundings of it (:math:`2\epsilon_{32}|m|`): exactly the
    constant of a constant row, whose float32 mean is the constant times :math:`n` (exact)
    times :math:`1/n` (one rounding each), and elsewhere a move :math:`d` of at most 4
    roundings, which adds :math:`d^2 \le (4\epsilon_{32}\mu)^2` to the variance: below
    its own rounding unless :math:`|\mu|/\sigma > 10^3`, where half-precision values are
    quantized to a few levels. (Correcting the variance for it would cost XLA:GPU its
    one-kernel fusion.)"""
    info = jnp.finfo(dtype)
    nearest = lax.reduce_precision(mean, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    close = jnp.abs(mean - nearest) <= 2 * jnp.finfo(mean.dtype).eps * jnp.abs(mean)
    return jnp.where(close, nearest, mean)


def _refined_rows(x: jax.Array, axes: tuple[int, ...], correction: str = "refine",
                  dtype: Any = None) -> ShiftedMoments:
    r"""Row reductions fused by XLA into the row's one kernel: the mean :math:`m`, made
    exact for a constant row as ``correction`` says (:func:`_mean_correction`:
    ``"refine"``, :math:`m + \frac1n\sum (x - m)`; ``"snap"``, :func:`_snapped_mean` to
    ``dtype``; ``"none"``), and
    :math:`\frac1n\sum (x - m)^2`. ``pivot`` is that mean.

    Args:
      x: the rows, float32.
      axes: the trailing axes of a row.
      correction: ``"refine"``, ``"snap"`` or ``"none"``.
      dtype: the input's half-precision dtype, for ``"snap"``.
    """
    count = element_count(x.shape, axes, None, x.dtype)
    safe_count = jnp.maximum(count, 1)  # empty sets: 0, not NaN
    mean = jnp.sum(x, axis=axes, keepdims=True) / safe_count
    if correction == "refine":
        mean = mean + jnp.sum(x - mean, axis=axes, keepdims=True) / safe_count
    elif correction == "snap":
        mean = _snapped_mean(mean, dtype)
    var = jnp.sum(jnp.square(x - mean), axis=axes, keepdims=True) / safe_count
    return ShiftedMoments(mean, jnp.zeros_like(mean), var, _count_like(count, mean))


def _group_pivot_shifted(x: jax.Array, raw: jax.Array, axes: tuple[int, ...]
                         ) -> ShiftedMoments:
    """TPU, GroupNorm's ``(..., groups, channels per group)`` view: the shifted single pass
    with the mean of each group's channels at the first position as the pivot
    (:func:`_group_first_channels`). XLA:TPU would copy all of ``x`` into a layout of its
    own for a variadic reduction over the split view, or for a strided slice of its
    channels. For a constant set the pivot differs from the constant by at most a
    rounding, which the shifted sums carry exactly (``x - p`` is exact near ``p``)."""
    if any(x.shape[a] == 0 for a in axes):
        return _pivot_shifted(x, raw, axes)  # empty sets: a zero pivot
    pivot = jnp.mean(_group_first_channels(raw, axes).astype(x.dtype), axis=axes,
                     keepdims=True)
    pivot = lax.stop_gradient(lax.optimization_barrier(pivot))
    return _from_sums(pivot, *_shifted_sums(x, pivot, axes, None))


def _group_first_channels(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """In GroupNorm's view (:func:`_group_channels`), each group's channels at the first
    index of the other reduction axes, sliced from the view that merges groups and
    channels (the layout ``x`` came in): XLA costs a slice of the split view as a read of
    all of ``x`` (GPU) or lays ``x`` out anew for it (TPU)."""
    merged = x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))
    first = tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim - 2))
    return merged[first].reshape(
        tuple(1 if a in axes else n for a, n in enumerate(x.shape[:-1])) + x.shape[-1:])


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth)."""
    total = a + b
    b_part = total - a
    return total, (a - (total - b_part)) + (b - b_part)


def _merge_moments(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]
                   ) -> tuple[jax.Array, ...]:
    r"""Chan, Golub & LeVeque's pairwise update of ``(n, mean, mean's low part, M2)``,
    :math:`M_2 = \sum (x - \mu)^2`: with :math:`\delta = \mu_b - \mu_a`,
    :math:`\mu = \mu_a + \delta\,n_b/n`, :math:`M_2 = M_{2a} + M_{2b} + \delta^2 n_a
    n_b/n`. The mean is carried as an unevaluated sum ``high + low`` (the rounding error
    of each update is kept, :func:`_two_sum`), else its error would grow with every merge
    at a large offset. Exact for constant sets (:math:`\delta = 0`); ``n = 0`` merges
    to zeros."""
    count_a, high_a, low_a, spread_a = a
    count_b, high_b, low_b, spread_b = b
    count = count_a + count_b
    weight = count_b / jnp.maximum(count, 1)
    delta = (high_b - high_a) + (low_b - low_a)
    high, error = _two_sum(high_a, delta * weight)
    return count, high, low_a + error, spread_a + spread_b + delta * delta * count_a * weight


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _merged_moments(x: jax.Array, axes: tuple[int, ...]) -> ShiftedMoments:
    """TPU: the statistics in one variadic reduction that merges ``(1, x, 0, 0)`` per
    element with :func:`_merge_moments`: no pivot, no branch, two-pass accuracy at any
    offset. XLA:TPU fuses the whole reduction into one pass over ``x``, at or below the
    estimated cycles of Flax's two plain sums (``benchmarks/RESULTS.md``). ``pivot`` and
    ``offset`` are the mean's high and low parts."""
    x = x.astype(statistics_dtype(x.dtype))
    zero = jnp.zeros((), x.dtype)
    zeros = jnp.zeros_like(x)
    sums = lax.reduce((jnp.ones_like(x), x, zeros, zeros), (zero,) * 4, _merge_moments, axes)
    _, high, low, spread = (jnp.expand_dims(v, axes) for v in sums)
    # the count as every other path gives it (replicated under shard_map, not varying)
    count = _count_like(element_count(x.shape, axes, None, x.dtype), high)
    return ShiftedMoments(high, low, spread / jnp.maximum(count, 1), count)


@_merged_moments.defjvp
def _merged_moments_jvp(axes: tuple[int, ...], primals: tuple[jax.Array],
                        tangents: tuple[jax.Array]) -> tuple[ShiftedMoments, ShiftedMoments]:
    r""":math:`\dot\mu = \frac1n\sum\dot x`,
    :math:`\dot{\sigma^2} = \frac2n\sum (x - \mu)\dot x` (a variadic reduction has no
    derivative rule of its own)."""
    (x,), (dx,) = primals, tangents
    moments = _merged_moments(x, axes)
    dx = dx.astype(moments.mean.dtype)
    safe_count = jnp.maximum(moments.count, 1)
    dmean = jnp.sum(dx, axis=axes, keepdims=True) / safe_count
    dvar = 2 * jnp.sum((x.astype(dx.dtype) - moments.mean) * dx, axis=axes,
                       keepdims=True) / safe_count
    zeros = jnp.zeros_like(dmean)
    return moments, ShiftedMoments(zeros, dmean, dvar, zeros)


def merge_members(count: jax.Array, pivot: jax.Array, offset: jax.Array, var: jax.Array,
                  member_axes: tuple[int, ...]) -> ShiftedMoments:
    r"""The statistics of the union of members' sets, each given (stacked along
    ``member_axes``) as its count :math:`n_d`, mean :math:`p_d + o_d` and variance
    :math:`\sigma_d^2` (Chan, Golub & LeVeque 1979). Relative to a reference :math:`r`, the
    largest counted member's pivot (a data value, so :math:`p_d - r` is exact for nearby
    pivots), :math:`\delta_d = (p_d - r) + o_d`, :math:`N = \sum n_d`,

    .. math::
        \mu = r + o,\quad o = \tfrac1N \textstyle\sum n_d\delta_d,\qquad
        \sigma^2 = \tfrac1N \sum n_d\,(\sigma_d^2 + (\delta_d - o)^2).

    Sums of non-negative terms and differences of nearby means: no cancellation at any
    offset; exact for unequal counts; members with :math:`n_d = 0` (fully masked) add
    nothing. The member axes are kept with size one."""
    count = jnp.broadcast_to(count, pivot.shape)
    counted = count > 0
    reference = jnp.max(jnp.where(counted, pivot, -jnp.inf), axis=member_axes, keepdims=True)
    reference = lax.stop_gradient(jnp.where(jnp.isfinite(reference), reference, 0))
    delta = jnp.where(counted, (pivot - reference) + offset, 0)
    total = jnp.sum(count, axis=member_axes, keepdims=True)
    safe_total = jnp.maximum(total, 1)
    merged_offset = jnp.sum(count * delta, axis=member_axes, keepdims=True) / safe_total
    spread = jnp.where(counted, count * (var + jnp.square(delta - merged_offset)), 0)
    merged_var = jnp.sum(spread, axis=member_axes, keepdims=True) / safe_total
    return ShiftedMoments(reference, merged_offset, merged_var, total)


def _stacked(moments: ShiftedMoments) -> jax.Array:
    """``(count, pivot, offset, var)`` as one array (leading axis of 4): one collective."""
    count = moments.count + jnp.zeros_like(moments.pivot)  # the pivot's shape and sharding
    return jnp.stack([count, moments.pivot, moments.offset, moments.var])


def _varying_in_shard_map(x: jax.Array, axis_name: Any, axis_index_groups: Any) -> bool:
    """Whether ``x`` varies across ``axis_name`` as a ``shard_map`` manual axis (whose
    replication check needs the gathered statistics marked invariant)."""
    names = set(axis_name) if isinstance(axis_name, (tuple, list)) else {axis_name}
    aval = jax.typeof(x)
    varying = getattr(aval, "vma", None)  # its name before JAX 0.10
    if varying is None:
        varying = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    return axis_index_groups is None and names <= set(varying)


def _gathered_across(moments: ShiftedMoments, axis_name: Any, axis_index_groups: Any
                     ) -> ShiftedMoments:
    r"""The statistics of the concatenated batch of every member of ``axis_name``: one
    ``all_gather`` of each member's :math:`(n, p, o, \sigma^2)`, then every member merges
    them locally in the same order (:func:`merge_members`), so all hold the same values.
    Its derivative is one all-reduce. A tuple of ``vmap`` axis names is gathered one name
    at a time (JAX's batching of a multi-name ``all_gather`` fails)."""
    stacked = _stacked(moments)
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if len(names) > 1 and axis_index_groups is None and not _varying_in_shard_map(
            stacked, axis_name, None):
        for name in reversed(names):  # the first name's members end up outermost
            stacked = lax.all_gather(stacked, name)
        members = tuple(range(len(names)))
    else:
        # every member (of a group) merges the same values: the result is invariant
        # across the axis, as a psum's would be (shard_map's replication check)
        to = {"to": "invarying"} if _varying_in_shard_map(stacked, axis_name,
                                                           axis_index_groups) else {}
        stacked = lax.all_gather(stacked, axis_name, axis_index_groups=axis_index_groups,
                                 **to)
        members = (0,)
    quantities = len(members)  # the axis of (count, pivot, offset, var)
    merged = merge_members(*(lax.index_in_dim(stacked, i, quantities, keepdims=False)
                             for i in range(4)), member_axes=members)
    return ShiftedMoments(*(value.reshape(value.shape[len(members):]) for value in merged))


def _split_shards(x: jax.Array, shards: dict[int, int]) -> jax.Array:
    """``x`` with each axis of ``shards`` split as ``(shards, rest)``, one axis per reshape
    (the split an explicitly sharded axis defines; two at once are not)."""
    for axis in sorted(shards, reverse=True):  # from the last, so earlier axes keep place
        size = x.shape[axis]
        x = x.reshape(x.shape[:axis] + (shards[axis], size // shards[axis]) + x.shape[axis + 1:])
    return x


def _sharded_moments(x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None,
                     shards: dict[int, int], explicit: bool = True) -> ShiftedMoments:
    """Sets that span explicitly sharded axes (:mod:`jaxnorm._sharding`): each such axis
    viewed as ``(shards, rest)`` (the only split defined on it), every shard's moments
    over ``rest`` and the other axes (the shifted single pass with a pivot sampled from
    the shard, :func:`_pivot_shifted`; two passes under a mask), gathered
    (one all-gather of ``4 x shards`` values per set) and merged exactly
    (:func:`merge_members`). ``explicit=False``: ``shards`` are the members of an Auto
    mesh's batch (:func:`jaxnorm._sharding.auto_batch_shards`), gathered by a sharding
    constraint."""
    inner, members, spec = [], [], []  # in the view, with one more axis per shard split
    x_spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
    for axis in range(x.ndim):
        if axis in shards:
            members.append(len(spec))
            inner.append(len(spec) + 1)
            spec += [None, None]
        else:
            if axis in axes:
                inner.append(len(spec))
            spec.append(None if axis in axes else x_spec[axis])
    raw = _split_shards(x, shards)
    converted = raw.astype(statistics_dtype(raw.dtype))
    if mask is None:  # no branch: a lax.cond's predicate would be one more collective
        local = _pivot_shifted(converted, raw, tuple(inner))
    else:
        local = _two_pass(converted, tuple(inner), _split_shards(mask, shards))
    if explicit:
        gathered = jax.sharding.reshard(_stacked(local), PartitionSpec(None, *spec))
    else:  # Auto axes: replicate the members' moments, leave the rest to the partitioner
        spec = [None if axis in members or axis in inner else PartitionSpec.UNCONSTRAINED
                for axis in range(len(spec))]
        gathered = lax.with_sharding_constraint(_stacked(local), PartitionSpec(None, *spec))
    merged = merge_members(*(gathered[i] for i in range(4)), member_axes=tuple(members))
    keepdims = _keepdims_shape(x.shape, axes)
    return ShiftedMoments(*(value.reshape(keepdims) for value in merged))


def shifted_moments(
    x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None = None, *,
    axis_name: Any = None, axis_index_groups: Any = None, centered: bool = True,
    fast_variance: bool = False, single_pass: bool = False,
) -> ShiftedMoments:
    r"""The statistics of a floating ``x`` (summed in at least float32), with canonical
    ``axes`` and a full-shape boolean ``mask`` (module docstring).

    Sets that span an explicitly sharded axis, or the batch under an Auto mesh: the
    shards' (members') moments merged (:func:`_sharded_moments`). Across ``axis_name``:
    each member's own stable statistics, one ``all_gather`` and a local exact merge
    (:func:`_gathered_across`), stable from the first step whatever the offset.
    ``centered=False`` gives mean 0 and :math:`E[x^2]`; ``fast_variance`` Flax's unshifted
    one-pass formula; both one ``psum``."""
    raw, x = x, x.astype(statistics_dtype(x.dtype))
    if centered and not fast_variance:
        shards, explicit = spanned_shards(x, axes)
        if shards:
            local = _sharded_moments(raw, axes, mask, shards, explicit)
        else:
            local = local_moments(raw, axes, mask, single_pass)
        if axis_name is None:
            return local
        return _gathered_across(local, axis_name, axis_index_groups)
    pivot = jnp.zeros(_keepdims_shape(x.shape, axes), x.dtype)
    sums = _shifted_sums(x, pivot, axes, mask)
    if axis_name is not None:
        sums = lax.psum(sums, axis_name, axis_index_groups=axis_index_groups)
    moments = _from_sums(pivot, *sums)
    if not centered:
        return moments._replace(offset=jnp.zeros_like(moments.offset),
                                var=sums[2] / jnp.maximum(sums[0], 1))
    return moments


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
    axes = canonicalize_axes(axes, x.ndim, "axes")
    mask = broadcast_mask(mask, x.shape)
    if jnp.iscomplexobj(x):
        return _complex_moments(x.astype(statistics_dtype(x.dtype)), axes, mask, axis_name,
                                axis_index_groups)
    moments = shifted_moments(x, axes, mask, axis_name=axis_name,
                              axis_index_groups=axis_index_groups, centered=centered,
                              fast_variance=fast_variance)
    return moments.mean, moments.var, moments.count


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
