r"""Instance normalization and the style-transfer norms built on it: adaptive instance
norm (AdaIN) and conditional instance norm. Axis 0 is the batch axis; statistics are per
example and channel over the remaining (spatial) axes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._affine import compute_dtype, output_dtype, scaled_rstd, standardize
from jaxnorm._axes import (
    Axes,
    canonicalize_axes,
    check_eps,
    check_floating,
    check_shape,
    complement_axes,
    expand_to_rank,
    feature_shape,
)
from jaxnorm._normalize import normalize_with_moments
from jaxnorm._running import BatchMoments
from jaxnorm._stats import moments

Array = jax.Array


def spatial_axes(ndim: int, features: tuple[int, ...], shape: tuple[int, ...],
                 caller: str, argument: Any, allow_none: bool = False) -> tuple[int, ...]:
    """The axes except the batch axis 0 and ``features``; errors name ``caller``. None
    left raises unless ``allow_none``."""
    if 0 in features:
        raise ValueError("feature_axes must not contain the batch axis 0")
    reduction = complement_axes(ndim, (0,), features)
    if not reduction and not allow_none:
        raise ValueError(
            f"{caller} needs a spatial axis besides the batch axis 0 and "
            f"feature_axes={argument!r}; the input has shape {shape}"
        )
    return reduction


def _pooled_instance_moments(
    mean: Array, var: Array, count: Array, features: tuple[int, ...]
) -> BatchMoments:
    r"""The instances' statistics (keepdims) pooled per channel over the batch: with
    :math:`n_i` counted elements in instance :math:`i`, mean :math:`\sum_i n_i\mu_i /
    \sum_i n_i`, variance :math:`\sum_i n_i\sigma^2_i / \sum_i n_i`, count :math:`\sum_i
    n_i`, and the non-empty instances as the groups, so that the unbiased running variance
    is :math:`\sum_i n_i\sigma^2_i / \sum_i (n_i - 1)` (PyTorch's mean of the instances'
    unbiased variances when they count alike)."""
    count = jnp.broadcast_to(count, mean.shape).astype(mean.real.dtype)
    axes = complement_axes(mean.ndim, features)  # the batch axis and the (size-1) reduced axes
    total = jnp.sum(count, axis=axes)
    safe_total = jnp.maximum(total, 1)
    return BatchMoments(
        jnp.sum(count * mean, axis=axes) / safe_total,
        jnp.sum(count * var, axis=axes) / safe_total,
        total,
        jnp.sum(count > 0, axis=axes, dtype=count.dtype),
    )


def instance_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    feature_axes: Axes = -1, eps: float = 1e-6, mask: Array | None = None,
    axis_name: Any = None, axis_index_groups: Any = None, dtype: Any = None,
    fast_variance: bool = False, return_moments: bool = False, allow_single_value: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, BatchMoments]:
    r"""Instance normalization (Ulyanov et al. 2016).

    :math:`y = (x - \mu_{n,c})/\sqrt{\sigma^2_{n,c} + \epsilon}\,\gamma_c + \beta_c` with
    statistics per example :math:`n` and channel :math:`c` over every axis except 0 and
    ``feature_axes``.

    ``return_moments`` also pools the instances' statistics per channel for running
    statistics (PyTorch's ``track_running_stats``): mean :math:`\sum_n k_n\mu_{n,c} /
    \sum_n k_n`, variance :math:`\sum_n k_n\sigma^2_{n,c} / \sum_n k_n` (:math:`k_n`:
    the elements instance :math:`n` counted), the non-empty instances as ``groups``, so
    ``unbiased=True`` stores the batch average of their unbiased variances, as PyTorch.

    Args:
      x: floating input, batch axis 0.
      scale: :math:`\gamma` of shape ``tuple(x.shape[a] for a in feature_axes)``, or None.
      bias: :math:`\beta`, the same shape, or None.
      feature_axes: the channel axes (never 0).
      eps: :math:`\epsilon`, non-negative.
      mask: boolean, broadcastable to ``x``; ``False`` elements do not count.
      axis_name: combine the statistics across this mapped axis (spatially sharded input).
      axis_index_groups: groups within ``axis_name``.
      dtype: output dtype; default: promoted dtype of ``x``, ``scale``, ``bias``.
      fast_variance: Flax's one-pass variance (see :func:`jaxnorm.moments`).
      return_moments: also return the pooled :class:`jaxnorm.BatchMoments` (feature
        shape, at least float32) for :func:`jaxnorm.update_running_statistics`.
      allow_single_value: accept ``(N, C)`` input (each value its own set, output
        ``bias``), as Flax's modules do; by default a ``ValueError``.
      implementation: ``"xla"``, ``"pallas"`` (the GroupNorm kernels, a group per
        channel; interpreted off a GPU; channels-last, no ``mask``/``axis_name``/
        ``return_moments``), or None (automatic: XLA for now;
        :mod:`jaxnorm._pallas_dispatch` routes it).

    Returns:
      ``y``, the shape of ``x``; with ``return_moments``, ``(y, moments)``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> jaxnorm.instance_norm(jnp.array([[[1.0], [3.0]]]), eps=0.0).tolist()
      [[[-1.0], [1.0]]]
    """
    x = check_floating(x, allow_complex=True)
    features = canonicalize_axes(feature_axes, x.ndim, "feature_axes")
    reduction = spatial_axes(x.ndim, features, x.shape, "instance_norm", feature_axes,
                             allow_single_value)
    y, mean, var, count = normalize_with_moments(
        x, reduction, scale, bias, feature_axes=features, eps=eps, mask=mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype,
        fast_variance=fast_variance, implementation=implementation, layer="InstanceNorm",
        statistics=return_moments,
    )
    return (y, _pooled_instance_moments(mean, var, count, features)) if return_moments else y


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

    Args:
      content: floating input whose statistics are replaced.
      style: floating input whose statistics are imposed (same rank and channels).
      feature_axes: the channel axes (never the batch axis 0).
      eps: :math:`\epsilon` in both standard deviations, non-negative.

    Returns:
      The shape and dtype of ``content``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> content = jnp.array([[[0.0], [2.0]]])
      >>> style = jnp.array([[[10.0], [14.0]]])
      >>> jaxnorm.adaptive_instance_norm(content, style, eps=0.0).tolist()
      [[[10.0], [14.0]]]
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
    content_reduction = spatial_axes(
        content.ndim, content_features, content.shape, "adaptive_instance_norm", feature_axes
    )
    style_reduction = complement_axes(style.ndim, (0,), style_features)
    style_mean, style_var = moments(style, style_reduction, keepdims=True)
    style_std = jnp.sqrt(style_var + eps)
    content_mean, content_var = moments(content, content_reduction, keepdims=True)
    compute = compute_dtype(content.dtype)
    return standardize(content, content_mean, scaled_rstd(content_var, style_std, eps, compute),
                       style_mean, content.dtype)


def _style_rows(style: Array, num_styles: int, batch: int) -> Any:
    """A function taking a ``(num_styles, ...)`` table to each example's row: integer ids
    select (an id outside ``[0, num_styles)`` gives NaN rows under ``jit``; eagerly it
    raises), float weights mix."""
    if jnp.issubdtype(style.dtype, jnp.integer):
        if style.shape not in ((), (batch,)):
            raise ValueError(f"an integer style_id has shape () or ({batch},), got {style.shape}")
        if not isinstance(style, jax.core.Tracer) and style.size and (
            style.min() < 0 or style.max() >= num_styles
        ):
            raise ValueError(f"style ids (style_id) must lie in [0, {num_styles}), got {style}")
        valid = (style >= 0) & (style < num_styles)

        def pick(table: Array) -> Array:
            rows = jnp.take(table, jnp.clip(style, 0, num_styles - 1), axis=0)
            flags = valid.reshape(valid.shape + (1,) * (rows.ndim - valid.ndim))
            return jnp.where(flags, rows, jnp.nan)

        return pick
    if jnp.issubdtype(style.dtype, jnp.floating):
        if style.shape != (batch, num_styles):
            raise ValueError(
                f"float style_id weights have shape ({batch}, num_styles={num_styles}), "
                f"got {style.shape}"
            )
        return lambda table: jnp.tensordot(style, table, axes=1)
    raise TypeError(f"style_id must be integer ids or float weights, got {style.dtype}")


def conditional_instance_norm(
    x: Array, style_id: Array, scale: Array | None, bias: Array | None, *,
    feature_axes: Axes = -1, eps: float = 1e-6, mask: Array | None = None, dtype: Any = None,
) -> Array:
    r"""Conditional instance normalization (Dumoulin et al. 2017):
    :math:`y = \gamma_s\,\mathrm{IN}(x) + \beta_s`, one :math:`(\gamma_s, \beta_s)` per style.

    An integer id outside ``[0, num_styles)`` raises ``ValueError`` when concrete; under
    ``jit`` (where it cannot raise) that example's output is NaN, never another style's.

    Args:
      x: floating input, batch axis 0.
      style_id: integer ids (a scalar, or one per example, shape ``(N,)``) or float mixing
        weights of shape ``(N, num_styles)`` (the styles' parameters mix linearly).
      scale: :math:`\gamma` table of shape ``(num_styles, *features)``, or None.
      bias: :math:`\beta` table, the same shape, or None.
      feature_axes: the channel axes (never 0).
      eps: :math:`\epsilon`, non-negative.
      mask: boolean, broadcastable to ``x``; ``False`` elements do not count.
      dtype: output dtype; default: promoted dtype of ``x``, ``scale``, ``bias``.

    Returns:
      ``y``, the shape of ``x``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> x = jnp.array([[[1.0], [3.0]]])
      >>> scale, bias = jnp.array([[1.0], [2.0]]), jnp.array([[0.0], [5.0]])
      >>> jaxnorm.conditional_instance_norm(x, 1, scale, bias, eps=0.0).tolist()
      [[[3.0], [7.0]]]
    """
    x = check_floating(x, allow_complex=True)
    features = canonicalize_axes(feature_axes, x.ndim, "feature_axes")
    shape = feature_shape(x.shape, features)
    tables = [t for t in (scale, bias) if t is not None]
    num_styles = jnp.shape(tables[0])[0] if tables else 1
    scale = check_shape(scale, (num_styles, *shape), "scale")
    bias = check_shape(bias, (num_styles, *shape), "bias")
    rows = _style_rows(jnp.asarray(style_id), num_styles, x.shape[0])
    out_dtype = output_dtype(dtype, x, *tables)
    normalized = instance_norm(
        x, feature_axes=features, eps=eps, mask=mask,
        dtype=jnp.promote_types(out_dtype, jnp.float32),
    )

    def per_example(table: Array) -> Array:
        picked = rows(table)  # (*features) for one id, else (N, *features)
        batch_axes = () if picked.ndim == len(shape) else (0,)
        return expand_to_rank(picked, x.ndim, batch_axes + features)

    y = normalized
    if scale is not None:
        y = y * per_example(scale)
    if bias is not None:
        y = y + per_example(bias)
    return y.astype(out_dtype)
