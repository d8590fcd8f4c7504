r"""``normalize`` and every named normalization as a choice of axes.

All variants compute :math:`y = (x - \mu_S)\,/\sqrt{\sigma^2_S + \epsilon}\cdot\gamma + \beta`;
they differ only in the reduction set :math:`S` and the axes that carry :math:`\gamma, \beta`
(see DESIGN.md). Statistics come from :func:`jaxnorm.moments`, nowhere else.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxnorm._axes import (
    Axes,
    broadcast_mask,
    canonicalize_axes,
    canonicalize_axis,
    check_eps,
    check_floating,
    check_shape,
    complement_axes,
    expand_to_rank,
    feature_shape,
)
from jaxnorm.fused import normalize_with_statistics
from jaxnorm.stats import moments, statistics_dtype

Array = jax.Array


def _output_dtype(dtype: Any, *arrays: Array | None) -> jnp.dtype:
    """``dtype`` if given, else the promoted dtype of the non-None ``arrays`` (as Flax)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.result_type(*(a for a in arrays if a is not None))


def _apply_statistics(
    x: Array,
    mean: Array | None,
    var: Array,
    scale: Array | None,
    bias: Array | None,
    eps: Any,
    dtype: jnp.dtype,
) -> Array:
    r""":math:`(x - \mu)\cdot(\gamma / \sqrt{\sigma^2 + \epsilon}) + \beta`, all broadcastable
    to ``x``; computed in at least float32 and returned in ``dtype``. ``mean=None`` skips
    centring (RMSNorm)."""
    compute = statistics_dtype(jnp.promote_types(x.dtype, dtype))
    multiplier = lax.rsqrt(var.astype(compute) + jnp.asarray(eps, compute))
    if scale is not None:
        multiplier = multiplier * scale.astype(compute)
    y = x.astype(compute)
    if mean is not None:
        y = y - mean.astype(compute)
    y = y * multiplier
    if bias is not None:
        y = y + bias.astype(compute)
    return y.astype(dtype)


def _broadcast_statistic(
    value: Array,
    name: str,
    x_shape: tuple[int, ...],
    reduction_axes: tuple[int, ...],
    feature_axes: tuple[int, ...],
) -> Array:
    """Accepts a given mean/var of keepdims shape or, when the reduction and feature axes
    cover ``x``, of feature shape; returns it broadcastable to ``x``."""
    value = jnp.asarray(value)
    kept = tuple(1 if a in reduction_axes else s for a, s in enumerate(x_shape))
    if value.shape == kept:
        return value
    features = feature_shape(x_shape, feature_axes)
    covers = set(reduction_axes) | set(feature_axes) == set(range(len(x_shape)))
    if covers and value.shape == features:
        return expand_to_rank(value, len(x_shape), feature_axes)
    raise ValueError(
        f"{name} has shape {value.shape}; expected the feature shape {features} "
        f"or the statistics shape {kept}"
    )


def normalize(
    x: Array,
    reduction_axes: Axes,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    feature_axes: Axes = -1,
    eps: float = 1e-5,
    mean: Array | None = None,
    var: Array | None = None,
    mask: Array | None = None,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    centered: bool = True,
    fast_variance: bool = False,
) -> Array:
    r"""Normalizes ``x`` over ``reduction_axes`` and applies per-feature ``scale``/``bias``.

    :math:`y = (x - \mu) \cdot \mathrm{rsqrt}(\sigma^2 + \epsilon) \cdot \gamma + \beta`, with
    :math:`\mu, \sigma^2` from :func:`jaxnorm.moments` unless both ``mean`` and ``var`` are
    given. ``centered=False`` gives RMS normalization (:math:`\mu = 0`, :math:`\sigma^2 =
    E[x^2]`). ``scale``/``bias`` have shape ``tuple(x.shape[a] for a in feature_axes)``
    with the axes in increasing order, as Flax orders them (``feature_axes=(2, 1)`` means
    ``(1, 2)``).
    ``fast_variance`` selects the cancelling one-pass variance (see :func:`moments`).
    """
    x = check_floating(x)
    reduction = canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
    features = canonicalize_axes(feature_axes, x.ndim, "feature_axes")
    check_eps(eps)
    shape = feature_shape(x.shape, features)
    scale = check_shape(scale, shape, "scale")
    bias = check_shape(bias, shape, "bias")
    out_dtype = _output_dtype(dtype, x, scale, bias)
    if (mean is None) != (var is None):
        raise ValueError("mean and var must be given together (or both left None)")
    if mean is None and axis_name is None and not isinstance(eps, jax.core.Tracer):
        return normalize_with_statistics(
            x,
            None if scale is None else expand_to_rank(scale, x.ndim, features),
            None if bias is None else expand_to_rank(bias, x.ndim, features),
            broadcast_mask(mask, x.shape),
            reduction,
            float(eps),
            out_dtype,
            centered,
            fast_variance,
        )[0]
    if mean is None:
        mean, var = moments(
            x,
            reduction,
            mask=mask,
            axis_name=axis_name,
            axis_index_groups=axis_index_groups,
            keepdims=True,
            centered=centered,
            fast_variance=fast_variance,
        )
    else:
        broadcast_mask(mask, x.shape)
        mean = _broadcast_statistic(mean, "mean", x.shape, reduction, features)
        var = _broadcast_statistic(var, "var", x.shape, reduction, features)
    return _apply_statistics(
        x,
        mean if centered else None,
        var,
        None if scale is None else expand_to_rank(scale, x.ndim, features),
        None if bias is None else expand_to_rank(bias, x.ndim, features),
        eps,
        out_dtype,
    )


def batch_norm(
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
) -> tuple[Array, Array, Array]:
    r"""Training-mode batch normalization (Ioffe & Szegedy 2015).

    Statistics over every axis except ``axis`` (the feature axes). Returns ``(y, mean, var)``
    with the biased batch mean and variance in feature shape and at least float32, for
    running averages.
    """
    x = check_floating(x)
    features = canonicalize_axes(axis, x.ndim, "axis")
    reduction = complement_axes(x.ndim, features)
    values_per_channel = 1
    for a in reduction:
        values_per_channel *= x.shape[a]
    if values_per_channel <= 1 and axis_name is None:
        raise ValueError(
            f"batch_norm in training mode needs more than one value per channel; got x of "
            f"shape {x.shape} with feature axis={axis!r}"
        )
    check_eps(eps)
    shape = feature_shape(x.shape, features)
    scale = check_shape(scale, shape, "scale")
    bias = check_shape(bias, shape, "bias")
    if axis_name is None and not isinstance(eps, jax.core.Tracer):
        y, mean, var = normalize_with_statistics(
            x,
            None if scale is None else expand_to_rank(scale, x.ndim, features),
            None if bias is None else expand_to_rank(bias, x.ndim, features),
            broadcast_mask(mask, x.shape),
            reduction,
            float(eps),
            _output_dtype(dtype, x, scale, bias),
            True,
        )
        return y, mean.reshape(shape), var.reshape(shape)
    mean, var = moments(
        x,
        reduction,
        mask=mask,
        axis_name=axis_name,
        axis_index_groups=axis_index_groups,
        keepdims=True,
    )
    y = normalize(
        x,
        reduction,
        scale,
        bias,
        feature_axes=features,
        eps=eps,
        mean=mean,
        var=var,
        dtype=dtype,
    )
    return y, mean.reshape(shape), var.reshape(shape)


def batch_norm_inference(
    x: Array,
    mean: Array,
    var: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    axis: Axes = -1,
    eps: float = 1e-5,
    dtype: Any = None,
) -> Array:
    r"""Evaluation-mode batch normalization with given statistics, as one fused ``x·a + b``.

    :math:`a = \gamma / \sqrt{\sigma^2 + \epsilon}`, :math:`b = \beta - \mu a`.
    """
    x = check_floating(x)
    features = canonicalize_axes(axis, x.ndim, "axis")
    check_eps(eps)
    shape = feature_shape(x.shape, features)
    mean = check_shape(mean, shape, "mean")
    var = check_shape(var, shape, "var")
    scale = check_shape(scale, shape, "scale")
    bias = check_shape(bias, shape, "bias")
    out_dtype = _output_dtype(dtype, x, scale, bias)
    compute = statistics_dtype(jnp.promote_types(x.dtype, out_dtype))
    multiplier = lax.rsqrt(var.astype(compute) + jnp.asarray(eps, compute))
    if scale is not None:
        multiplier = multiplier * scale.astype(compute)
    offset = -mean.astype(compute) * multiplier
    if bias is not None:
        offset = offset + bias.astype(compute)
    multiplier = expand_to_rank(multiplier, x.ndim, features)
    offset = expand_to_rank(offset, x.ndim, features)
    return (x.astype(compute) * multiplier + offset).astype(out_dtype)


def layer_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    eps: float = 1e-6,
    mask: Array | None = None,
    dtype: Any = None,
) -> Array:
    """Layer normalization (Ba et al. 2016): statistics per example over ``reduction_axes``."""
    return normalize(
        x,
        reduction_axes,
        scale,
        bias,
        feature_axes=feature_axes,
        eps=eps,
        mask=mask,
        dtype=dtype,
    )


def rms_norm(
    x: Array,
    scale: Array | None = None,
    *,
    reduction_axes: Axes = -1,
    feature_axes: Axes = -1,
    eps: float = 1e-6,
    mask: Array | None = None,
    dtype: Any = None,
) -> Array:
    r"""RMS normalization (Zhang & Sennrich 2019): :math:`y = x / \sqrt{E[x^2] + \epsilon}\cdot\gamma`."""
    return normalize(
        x,
        reduction_axes,
        scale,
        feature_axes=feature_axes,
        eps=eps,
        mask=mask,
        dtype=dtype,
        centered=False,
    )


def instance_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    feature_axes: Axes = -1,
    eps: float = 1e-6,
    mask: Array | None = None,
    dtype: Any = None,
) -> Array:
    """Instance normalization (Ulyanov et al. 2016): statistics per example and channel over
    every axis except 0 and ``feature_axes``."""
    x = check_floating(x)
    features = canonicalize_axes(feature_axes, x.ndim, "feature_axes")
    if 0 in features:
        raise ValueError("feature_axes must not contain the batch axis 0")
    reduction = complement_axes(x.ndim, (0,), features)
    if not reduction:
        raise ValueError(
            f"instance_norm needs a spatial axis besides the batch axis 0 and "
            f"feature_axes={feature_axes!r}; x has shape {x.shape}"
        )
    return normalize(
        x, reduction, scale, bias, feature_axes=features, eps=eps, mask=mask, dtype=dtype
    )


def resolve_num_groups(channels: int, num_groups: int | None, group_size: int | None) -> int:
    """The number of groups from exactly one of ``num_groups`` / ``group_size``."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(
            "give exactly one of num_groups and group_size (pass num_groups=None together "
            f"with group_size); got num_groups={num_groups!r}, group_size={group_size!r}"
        )
    for name, value in (("num_groups", num_groups), ("group_size", group_size)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, np.integer))
        ):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if group_size is not None:
        if group_size <= 0 or channels % group_size:
            raise ValueError(
                f"group_size={group_size} must be positive and divide the {channels} channels"
            )
        return channels // group_size
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(
            f"num_groups={num_groups} must be positive and divide the {channels} channels"
        )
    return num_groups


def group_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    feature_axis: int = -1,
    eps: float = 1e-6,
    mask: Array | None = None,
    dtype: Any = None,
) -> Array:
    """Group normalization (Wu & He 2018): channels split into groups; statistics per example
    and group over every axis except 0. ``feature_axis=1`` serves NCHW."""
    x = check_floating(x)
    axis = canonicalize_axis(feature_axis, x.ndim, "feature_axis")
    if axis == 0:
        raise ValueError("feature_axis must not be the batch axis 0")
    channels = x.shape[axis]
    groups = resolve_num_groups(channels, num_groups, group_size)
    scale = check_shape(scale, (channels,), "scale")
    bias = check_shape(bias, (channels,), "bias")
    mask = broadcast_mask(mask, x.shape)
    grouped_shape = x.shape[:axis] + (groups, channels // groups) + x.shape[axis + 1 :]

    def split(value: Array | None) -> Array | None:
        return None if value is None else value.reshape(grouped_shape)

    def split_params(value: Array | None) -> Array | None:
        return None if value is None else value.reshape(groups, channels // groups)

    grouped = split(x)
    reduction = complement_axes(grouped.ndim, (0, axis))
    y = normalize(
        grouped,
        reduction,
        split_params(scale),
        split_params(bias),
        feature_axes=(axis, axis + 1),
        eps=eps,
        mask=split(mask),
        dtype=dtype,
    )
    return y.reshape(x.shape)


def local_response_norm(
    x: Array,
    *,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 1.0,
    feature_axis: int = -1,
) -> Array:
    r"""Local response normalization across channels (Krizhevsky et al. 2012).

    :math:`b_c = a_c\,(k + \tfrac{\alpha}{n}\sum_{c' = c - \lfloor n/2 \rfloor}^{c +
    \lfloor (n-1)/2 \rfloor} a_{c'}^2)^{-\beta}`, zero-padded, as ``torch.nn.LocalResponseNorm``.
    """
    x = check_floating(x)
    axis = canonicalize_axis(feature_axis, x.ndim, "feature_axis")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    size = int(size)
    compute = statistics_dtype(x.dtype)
    xc = x.astype(compute)
    window = [1] * x.ndim
    window[axis] = size
    padding = [(0, 0)] * x.ndim
    padding[axis] = (size // 2, (size - 1) // 2)
    square_sum = lax.reduce_window(
        xc * xc, 0.0, lax.add, window, [1] * x.ndim, padding  # a Python 0 keeps jit'd grad-of-grad
    )
    denominator = k + (alpha / size) * square_sum
    return (xc * denominator ** (-beta)).astype(x.dtype)


def adaptive_instance_norm(
    content: Array,
    style: Array,
    *,
    feature_axes: Axes = -1,
    eps: float = 1e-5,
) -> Array:
    r"""Adaptive instance normalization (Huang & Belongie 2017).

    :math:`\mathrm{AdaIN}(c, s) = \sigma(s)\,\frac{c - \mu(c)}{\sigma(c)} + \mu(s)`, with
    :math:`\sigma = \sqrt{\mathrm{var} + \epsilon}` and statistics per example and channel
    over every axis except 0 and ``feature_axes``. ``style`` may differ from ``content`` in
    spatial size; its batch is ``content``'s or 1.
    """
    content = check_floating(content, "content")
    style = check_floating(style, "style")
    check_eps(eps)
    content_features = canonicalize_axes(feature_axes, content.ndim, "feature_axes")
    style_features = canonicalize_axes(feature_axes, style.ndim, "feature_axes")
    if content.ndim != style.ndim:
        raise ValueError(
            f"style has {style.ndim} dimensions but content has {content.ndim}"
        )
    if 0 in content_features:
        raise ValueError("feature_axes must not contain the batch axis 0")
    if feature_shape(style.shape, style_features) != feature_shape(
        content.shape, content_features
    ):
        raise ValueError(
            f"style has channels {feature_shape(style.shape, style_features)} but content "
            f"has {feature_shape(content.shape, content_features)}"
        )
    if style.shape[0] not in (1, content.shape[0]):
        raise ValueError(
            f"style has batch size {style.shape[0]}; expected 1 or content's {content.shape[0]}"
        )
    content_reduction = complement_axes(content.ndim, (0,), content_features)
    style_reduction = complement_axes(style.ndim, (0,), style_features)
    if not content_reduction:
        raise ValueError(
            f"adaptive_instance_norm needs a spatial axis besides the batch axis 0 and "
            f"feature_axes={feature_axes!r}; content has shape {content.shape}"
        )
    style_mean, style_var = moments(style, style_reduction, keepdims=True)
    style_std = jnp.sqrt(style_var + eps)
    content_mean, content_var = moments(content, content_reduction, keepdims=True)
    return _apply_statistics(
        content, content_mean, content_var, style_std, style_mean, eps, content.dtype
    )
