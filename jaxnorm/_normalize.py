r"""``normalize``: every normalization in jaxnorm as a choice of axes.

All variants compute :math:`y = (x - \mu_S)\,/\sqrt{\sigma^2_S + \epsilon}\cdot\gamma + \beta`;
they differ only in the reduction set :math:`S` and the axes that carry :math:`\gamma, \beta`
(``docs/design.md``). This file validates the arguments and hands over to the dispatcher.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._affine import NormSpec, output_dtype
from jaxnorm._axes import (
    Axes,
    broadcast_mask,
    canonicalize_axes,
    check_eps,
    check_floating,
    check_shape,
    expand_to_rank,
    feature_shape,
)
from jaxnorm._dispatch import normalize_over

Array = jax.Array


def feature_parameters(
    x: Array, scale: Any, bias: Any, features: tuple[int, ...],
    names: tuple[str, str] = ("scale", "bias"),
) -> tuple[Array | None, Array | None]:
    """``scale`` and ``bias`` checked against the feature shape of ``x`` (errors name them
    as ``names``) and reshaped to broadcast against it (``None`` stays ``None``)."""
    shape = feature_shape(x.shape, features)
    scale = check_shape(scale, shape, names[0])
    bias = check_shape(bias, shape, names[1])
    return tuple(  # type: ignore[return-value]
        None if p is None else expand_to_rank(p, x.ndim, features) for p in (scale, bias)
    )


def static_eps(eps: Any) -> tuple[float, Any]:
    """``(spec_eps, traced_eps)``: a concrete ``eps`` as a float for the static settings,
    or a traced one passed on (then the dispatcher takes the plain path)."""
    check_eps(eps)
    if isinstance(eps, jax.core.Tracer):
        return 0.0, eps
    return float(eps), None


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
    x: Array, reduction_axes: Axes, scale: Array | None = None, bias: Array | None = None, *,
    feature_axes: Axes = -1, eps: float = 1e-5, mean: Array | None = None,
    var: Array | None = None, mask: Array | None = None, axis_name: Any = None,
    axis_index_groups: Any = None, dtype: Any = None, centered: bool = True,
    fast_variance: bool = False,
) -> Array:
    r"""Normalizes ``x`` over ``reduction_axes`` and applies per-feature ``scale``/``bias``.

    .. math::
        y = (x - \mu)\,\frac{\gamma}{\sqrt{\sigma^2 + \epsilon}} + \beta,

    with :math:`\mu, \sigma^2` from :func:`jaxnorm.moments` over ``reduction_axes`` unless
    both ``mean`` and ``var`` are given. Every named normalization is this function with a
    particular choice of axes.

    Args:
      x: floating input.
      reduction_axes: the axes :math:`S` the statistics are taken over.
      scale: :math:`\gamma`, shape ``tuple(x.shape[a] for a in feature_axes)`` with the
        axes in increasing order, as Flax orders them; None for 1.
      bias: :math:`\beta`, the same shape; None for 0.
      feature_axes: the axes that carry ``scale`` and ``bias``.
      eps: :math:`\epsilon`, non-negative (may be traced).
      mean: given statistics instead of ``x``'s (with ``var``): keepdims shape, or feature
        shape when the reduction and feature axes cover ``x``.
      var: the given variance, with ``mean``.
      mask: boolean, broadcastable to ``x``; ``False`` elements do not count.
      axis_name: combine the statistics across this mapped axis (pmap, shard_map, vmap),
        weighted by element counts.
      axis_index_groups: groups within ``axis_name`` (as in ``lax.psum``).
      dtype: output dtype; default: promoted dtype of ``x``, ``scale``, ``bias``.
      centered: ``False`` gives RMS normalization (:math:`\mu = 0`,
        :math:`\sigma^2 = E[x^2]`).
      fast_variance: Flax's one-pass variance (see :func:`jaxnorm.moments`).

    Returns:
      ``y``, the shape of ``x``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> y = jaxnorm.normalize(jnp.array([[1.0, 2.0, 3.0]]), reduction_axes=-1)
      >>> [round(float(v), 3) for v in y[0]]
      [-1.225, 0.0, 1.225]
    """
    return normalize_with_moments(
        x, reduction_axes, scale, bias, feature_axes=feature_axes, eps=eps, mean=mean, var=var,
        mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype,
        centered=centered, fast_variance=fast_variance,
    )[0]


def normalize_with_moments(
    x: Array, reduction_axes: Axes, scale: Array | None = None, bias: Array | None = None, *,
    feature_axes: Axes = -1, eps: float = 1e-5, mean: Array | None = None,
    var: Array | None = None, mask: Array | None = None, axis_name: Any = None,
    axis_index_groups: Any = None, dtype: Any = None, centered: bool = True,
    fast_variance: bool = False, implementation: str | None = None, layer: str | None = None,
    statistics: bool = True,
) -> tuple[Array, Array | None, Array | None, Array | None]:
    """:func:`normalize` (the same arguments, checked) returning ``(y, mean, var, count)``
    as :func:`jaxnorm._dispatch.normalize_over` does: the statistics keep the reduced axes,
    ``count`` the elements each set counted (None for given statistics, and all three None
    where a Pallas kernel computed ``y``).

    Args (besides :func:`normalize`'s; the named layers pass them, :func:`normalize` not):
      implementation: the caller's ``implementation=``: ``"xla"``, ``"pallas"`` or None
        (automatic), as :class:`~jaxnorm._affine.NormSpec` holds it.
      layer: the named layer a Pallas kernel may compute (``NormSpec.layer``), or None.
      statistics: the caller uses the statistics, not only ``y``.
    """
    x = check_floating(x, allow_complex=True)
    reduction = canonicalize_axes(reduction_axes, x.ndim, "reduction_axes")
    features = canonicalize_axes(feature_axes, x.ndim, "feature_axes")
    spec_eps, traced_eps = static_eps(eps)
    scale, bias = feature_parameters(x, scale, bias, features)
    spec = NormSpec(reduction, spec_eps, output_dtype(dtype, x, scale, bias), centered,
                    fast_variance, implementation, layer)
    if (mean is None) != (var is None):
        raise ValueError("mean and var must be given together (or both left None)")
    mask = broadcast_mask(mask, x.shape)
    if mean is not None:
        mean = _broadcast_statistic(mean, "mean", x.shape, reduction, features)
        var = _broadcast_statistic(var, "var", x.shape, reduction, features)
    return normalize_over(x, scale, bias, spec, mask=mask, axis_name=axis_name,
                          axis_index_groups=axis_index_groups, eps=traced_eps, mean=mean,
                          var=var, statistics=statistics)
