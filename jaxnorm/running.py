r"""Training-time math shared by the Linen and NNX modules, written once.

* :func:`batch_norm_train` — training-mode batch normalization over the functional core,
  with two options: ghost batches (Hoffer et al. 2017, "Train longer, generalize better":
  statistics per consecutive group of ``virtual_batch_size`` examples) and batch
  renormalization (Ioffe 2017):

  .. math::
      r = \mathrm{sg}\big(\mathrm{clip}_{[1/r_{max},\,r_{max}]}(\sigma_B/\sigma)\big),\quad
      d = \mathrm{sg}\big(\mathrm{clip}_{[-d_{max},\,d_{max}]}((\mu_B-\mu)/\sigma)\big),\quad
      y = \Big(\frac{x-\mu_B}{\sigma_B}\,r + d\Big)\gamma + \beta,

  with :math:`\sigma_B = \sqrt{\sigma_B^2+\epsilon}`, :math:`\sigma = \sqrt{\sigma^2_{run}
  +\epsilon}` and ``sg`` = ``stop_gradient``. It returns the output and the batch moments
  (mean, biased variance, element count per channel).
* :func:`update_running_statistics` — the running averages kept in ``batch_stats``:
  :math:`ra \leftarrow m\,ra + (1-m)\,b` (Flax's momentum convention), or with
  ``momentum=None`` the exact cumulative average :math:`ra_k = ra_{k-1} + (b_k -
  ra_{k-1})/k` over the ``k`` batches seen (PyTorch's ``momentum=None``); ``unbiased``
  stores :math:`n/(n-1)\,\sigma^2_B` like PyTorch.
* :func:`group_normalize` — GroupNorm with Flax's ``reduction_axes`` and ``axis_name``;
  :func:`conditional_instance_norm` — per-style scale and bias after instance norm.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._axes import (
    Axes,
    broadcast_mask,
    canonicalize_axes,
    canonicalize_axis,
    check_floating,
    check_shape,
    complement_axes,
    expand_to_rank,
    feature_shape,
)
from jaxnorm.functional import instance_norm, normalize, resolve_num_groups
from jaxnorm.fused import normalize_with_statistics
from jaxnorm.stats import element_count, moments

Array = jax.Array

MOMENTS_COLLECTION = "batch_moments"
"""Linen collection where BatchNorm layers put their batch moments when it is mutable
(used by :func:`jaxnorm.recompute_batch_stats`)."""


class BatchMoments(NamedTuple):
    r"""Per-channel statistics of one training batch: mean, biased variance, the number of
    elements (over every device) they were computed from, and the number of (non-empty)
    groups with their own mean: 1, or the ghost batches. For ghost batches ``var`` is the
    pooled within-group variance :math:`\sum_g n_g\sigma_g^2 / \sum_g n_g`."""

    mean: Array
    var: Array
    count: Array
    groups: Array | int = 1


class RunningStatistics(NamedTuple):
    """The ``batch_stats`` of a BatchNorm layer; ``count`` (batches seen) only when
    ``momentum=None``."""

    mean: Array
    var: Array
    count: Array | None = None


def count_elements(
    x_shape: tuple[int, ...],
    reduction_axes: tuple[int, ...],
    mask: Array | None,
    axis_name: Any,
    axis_index_groups: Any,
) -> Array:
    """The number of (unmasked) elements in each reduction set, summed over ``axis_name``;
    float32, with the reduced axes kept."""
    kept = tuple(1 if a in reduction_axes else s for a, s in enumerate(x_shape))
    count = jnp.broadcast_to(element_count(x_shape, reduction_axes, mask, jnp.float32), kept)
    if axis_name is not None:
        count = lax.psum(count, axis_name, axis_index_groups=axis_index_groups)
    return count


def _ghost_batches(
    x: Array, mask: Array | None, features: tuple[int, ...], size: int
) -> tuple[Array, Array | None, tuple[int, ...]]:
    """Splits the batch axis 0 into ``(N // size, size)``; the group axis joins the
    feature axes, so each ghost batch gets its own statistics."""
    if 0 in features:
        raise ValueError("virtual_batch_size needs a batch axis 0 that is not a feature axis")
    if size <= 0 or x.shape[0] % size:
        raise ValueError(
            f"virtual_batch_size={size} must be positive and divide the batch size {x.shape[0]}"
        )
    grouped_shape = (x.shape[0] // size, size) + x.shape[1:]
    grouped_mask = None if mask is None else mask.reshape(grouped_shape)
    return x.reshape(grouped_shape), grouped_mask, (0,) + tuple(a + 1 for a in features)


def _renorm_corrections(
    mean: Array,
    var: Array,
    running_mean: Array,
    running_var: Array,
    eps: float,
    r_max: float,
    d_max: float,
) -> tuple[Array, Array]:
    """Ioffe (2017)'s r and d, without gradient; all arguments broadcast together."""
    batch_std = jnp.sqrt(var + eps)
    running_std = jnp.sqrt(running_var.astype(var.dtype) + eps)
    r = jnp.clip(batch_std / running_std, 1 / r_max, r_max)
    d = jnp.clip((mean - running_mean.astype(mean.dtype)) / running_std, -d_max, d_max)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def batch_norm_train(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    axis: Axes = -1,
    eps: float = 1e-5,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    virtual_batch_size: int | None = None,
    renorm: tuple[Array, Array, float, float] | None = None,
    require_spread: bool = True,
    fast_variance: bool = False,
) -> tuple[Array, BatchMoments]:
    """Training-mode batch normalization; returns ``(y, BatchMoments)``.

    ``renorm=(running_mean, running_var, r_max, d_max)`` selects batch renormalization;
    ``virtual_batch_size`` ghost batch norm (both may be combined): with ``axis_name`` each
    device's batch is split into ghost batches of its own (the global batch's consecutive
    groups) and only the returned moments are combined across devices.
    ``require_spread=False`` allows a single value per channel (Linen's ``init``);
    ``fast_variance`` selects the cancelling one-pass variance (Flax's ``use_fast_variance``).
    """
    x = check_floating(x)
    features = canonicalize_axes(axis, x.ndim, "axis")
    shape = feature_shape(x.shape, features)
    scale = check_shape(scale, shape, "scale")
    bias = check_shape(bias, shape, "bias")
    out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(
        *(a for a in (x, scale, bias) if a is not None)
    )
    mask = broadcast_mask(mask, x.shape)

    grouped, grouped_mask, stat_features = x, mask, features
    # Ghost batches are consecutive examples, so each lies on one device: their statistics
    # are local, and only the running-average summary is combined over `axis_name`.
    stats_axis_name, stats_index_groups = axis_name, axis_index_groups
    if virtual_batch_size is not None:
        grouped, grouped_mask, stat_features = _ghost_batches(
            x, mask, features, virtual_batch_size
        )
        stats_axis_name = stats_index_groups = None
    reduction = complement_axes(grouped.ndim, stat_features)
    per_channel = 1
    for a in reduction:
        per_channel *= grouped.shape[a]
    if per_channel <= 1 and stats_axis_name is None and require_spread:
        raise ValueError(
            f"BatchNorm in training mode needs more than one value per channel; got x of "
            f"shape {x.shape} with axis={axis!r}"
            + ("" if virtual_batch_size is None else f", virtual_batch_size={virtual_batch_size}")
        )

    # the common case takes the fused path with the closed-form derivative (jaxnorm.fused)
    fused = renorm is None and stats_axis_name is None and not isinstance(eps, jax.core.Tracer)
    if not fused:
        mean, var = moments(
            grouped,
            reduction,
            mask=grouped_mask,
            axis_name=stats_axis_name,
            axis_index_groups=stats_index_groups,
            keepdims=True,
            fast_variance=fast_variance,
        )
    count = count_elements(
        grouped.shape, reduction, grouped_mask, stats_axis_name, stats_index_groups
    )

    stat_shape = feature_shape(grouped.shape, stat_features)

    def per_statistic(value: Array | None) -> Array | None:
        return None if value is None else jnp.broadcast_to(value, stat_shape)

    scale_s, bias_s = per_statistic(scale), per_statistic(bias)
    if renorm is not None:
        running_mean, running_var, r_max, d_max = renorm
        r, d = _renorm_corrections(
            mean.reshape(stat_shape),
            var.reshape(stat_shape),
            jnp.broadcast_to(running_mean, stat_shape),
            jnp.broadcast_to(running_var, stat_shape),
            eps,
            r_max,
            d_max,
        )
        gamma = r if scale_s is None else scale_s * r
        beta = d if scale_s is None else scale_s * d
        scale_s, bias_s = gamma, beta if bias_s is None else bias_s + beta

    if fused:
        y, mean, var = normalize_with_statistics(
            grouped,
            None if scale_s is None else expand_to_rank(scale_s, grouped.ndim, stat_features),
            None if bias_s is None else expand_to_rank(bias_s, grouped.ndim, stat_features),
            grouped_mask,
            reduction,
            float(eps),
            out_dtype,
            True,
            fast_variance,
        )
        y = y.reshape(x.shape)
    else:
        y = normalize(
            grouped,
            reduction,
            scale_s,
            bias_s,
            feature_axes=stat_features,
            eps=eps,
            mean=mean,
            var=var,
            dtype=out_dtype,
        ).reshape(x.shape)

    mean, var, count = (v.reshape(stat_shape) for v in (mean, var, count))
    if virtual_batch_size is None:
        return y, BatchMoments(mean, var, count)
    sums = (
        jnp.sum(count, axis=0),
        jnp.sum(count * mean, axis=0),
        jnp.sum(count * var, axis=0),
        jnp.sum(count > 0, axis=0, dtype=count.dtype),
    )
    if axis_name is not None:
        sums = lax.psum(sums, axis_name, axis_index_groups=axis_index_groups)
    total, mean_sum, var_sum, groups = sums
    safe_total = jnp.maximum(total, 1)
    return y, BatchMoments(mean_sum / safe_total, var_sum / safe_total, total, groups)


def merge_moments(first: BatchMoments, second: BatchMoments) -> BatchMoments:
    r"""The moments of two batches together (Chan et al. 1979): with :math:`n = n_a + n_b`
    and :math:`\delta = \mu_b - \mu_a`, :math:`\mu = \mu_a + \delta n_b/n` and
    :math:`\sigma^2 = (n_a\sigma_a^2 + n_b\sigma_b^2 + \delta^2 n_a n_b/n)/n`. Used when
    one layer runs more than once in a forward pass (shared weights)."""
    total = first.count + second.count
    safe_total = jnp.maximum(total, 1)
    delta = second.mean - first.mean
    mean = first.mean + delta * second.count / safe_total
    spread = first.count * first.var + second.count * second.var
    var = (spread + delta * delta * first.count * second.count / safe_total) / safe_total
    return BatchMoments(mean, var, total, first.groups + second.groups)


def update_running_statistics(
    running: RunningStatistics,
    batch: BatchMoments,
    *,
    momentum: float | None,
    unbiased: bool = False,
) -> RunningStatistics:
    r"""The new ``batch_stats`` after one training batch (see the module docstring).

    With ``unbiased`` the stored variance is :math:`n/(n-1)\,\sigma^2_B` (:math:`n` = the
    batch's element count per channel, over all devices); for ghost batches the pooled
    unbiased :math:`\sum_g n_g\sigma_g^2/\sum_g(n_g-1)`."""
    var = batch.var
    if unbiased:
        var = var * batch.count / jnp.maximum(batch.count - batch.groups, 1)
    if momentum is None:
        if running.count is None:
            raise ValueError("momentum=None needs a batch count in the running statistics")
        seen = running.count + 1
        weight = 1 / seen.astype(batch.mean.dtype)
        new_mean = running.mean + (batch.mean - running.mean) * weight
        new_var = running.var + (var - running.var) * weight
    else:
        seen = running.count
        new_mean = momentum * running.mean + (1 - momentum) * batch.mean
        new_var = momentum * running.var + (1 - momentum) * var
    return RunningStatistics(
        lax.stop_gradient(new_mean.astype(running.mean.dtype)),
        lax.stop_gradient(new_var.astype(running.var.dtype)),
        seen,
    )


def group_normalize(
    x: Array,
    scale: Array | None,
    bias: Array | None,
    *,
    num_groups: int | None,
    group_size: int | None,
    feature_axis: int = -1,
    reduction_axes: Axes | None = None,
    eps: float = 1e-6,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    fast_variance: bool = False,
) -> Array:
    """Group normalization (Wu & He 2018) with Flax's ``reduction_axes``: statistics per
    group of channels over ``reduction_axes`` (default: every axis except 0); axes outside
    ``reduction_axes`` are batch axes. Combined over ``axis_name`` when given."""
    x = check_floating(x)
    axis = canonicalize_axis(feature_axis, x.ndim, "feature_axis")
    if reduction_axes is None:
        if axis == 0:
            raise ValueError("feature_axis must not be the batch axis 0")
        reduction = tuple(range(1, x.ndim))
    else:
        reduction = canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
        if axis not in reduction:
            raise ValueError(
                f"reduction_axes={reduction_axes!r} must include the feature axis {feature_axis}"
            )
    channels = x.shape[axis]
    groups = resolve_num_groups(channels, num_groups, group_size)
    scale = check_shape(scale, (channels,), "scale")
    bias = check_shape(bias, (channels,), "bias")
    mask = broadcast_mask(mask, x.shape)
    grouped_shape = x.shape[:axis] + (groups, channels // groups) + x.shape[axis + 1 :]
    # In the grouped array, axis `axis` holds the group and `axis + 1` the channel within it.
    grouped_reduction = tuple(a if a < axis else a + 1 for a in reduction)
    y = normalize(
        x.reshape(grouped_shape),
        grouped_reduction,
        None if scale is None else scale.reshape(groups, channels // groups),
        None if bias is None else bias.reshape(groups, channels // groups),
        feature_axes=(axis, axis + 1),
        eps=eps,
        mask=None if mask is None else mask.reshape(grouped_shape),
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        dtype=dtype,
        fast_variance=fast_variance,
    )
    return y.reshape(x.shape)


def conditional_instance_norm(
    x: Array,
    style_id: Array,
    scale: Array | None,
    bias: Array | None,
    *,
    feature_axes: Axes = -1,
    eps: float = 1e-6,
    mask: Array | None = None,
    dtype: Any = None,
) -> Array:
    r"""Conditional instance normalization (Dumoulin et al. 2017):
    :math:`y = \gamma_s\,\mathrm{IN}(x) + \beta_s`.

    ``scale``/``bias`` have shape ``(num_styles, *features)``; ``style_id`` is an integer id
    (scalar or shape ``(N,)``) or float mixing weights of shape ``(N, num_styles)``.
    """
    x = check_floating(x)
    features = canonicalize_axes(feature_axes, x.ndim, "feature_axes")
    shape = feature_shape(x.shape, features)
    tables = [t for t in (scale, bias) if t is not None]
    num_styles = tables[0].shape[0] if tables else None
    for table, name in ((scale, "scale"), (bias, "bias")):
        check_shape(table, (num_styles, *shape), name)
    style = jnp.asarray(style_id)
    batch = x.shape[0]
    if jnp.issubdtype(style.dtype, jnp.integer):
        if style.shape not in ((), (batch,)):
            raise ValueError(
                f"an integer style has shape () or ({batch},), got {style.shape}"
            )
        concrete = num_styles is not None and not isinstance(style, jax.core.Tracer)
        if concrete and style.size and (style.min() < 0 or style.max() >= num_styles):
            raise ValueError(f"style ids must lie in [0, {num_styles}), got {style}")

        def pick(table: Array) -> Array:
            return table[style]
    elif jnp.issubdtype(style.dtype, jnp.floating):
        if style.shape != (batch, num_styles):
            raise ValueError(
                f"float style weights have shape ({batch}, num_styles={num_styles}), "
                f"got {style.shape}"
            )

        def pick(table: Array) -> Array:
            return jnp.tensordot(style, table, axes=1)
    else:
        raise TypeError(f"style must be integer ids or float weights, got {style.dtype}")

    out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(x, *tables)
    normalized = instance_norm(
        x, feature_axes=features, eps=eps, mask=mask,
        dtype=jnp.promote_types(out_dtype, jnp.float32),
    )

    def per_example(table: Array) -> Array:
        picked = pick(table)
        if picked.ndim == len(shape):
            return expand_to_rank(picked, x.ndim, features)
        broadcast = [1] * x.ndim
        broadcast[0] = batch
        for axis in features:
            broadcast[axis] = x.shape[axis]
        return picked.reshape(broadcast)

    y = normalized
    if scale is not None:
        y = y * per_example(scale)
    if bias is not None:
        y = y + per_example(bias)
    return y.astype(out_dtype)
