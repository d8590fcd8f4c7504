r"""Group normalization (Wu & He 2018): channels split into groups, statistics per group."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxnorm._axes import (
    Axes,
    broadcast_mask,
    canonicalize_axes,
    canonicalize_axis,
    check_floating,
    check_shape,
)
from jaxnorm._normalize import normalize_with_moments

Array = jax.Array


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


def _grouped_reduction(
    ndim: int, axis: int, reduction_axes: Axes | None
) -> tuple[int, ...]:
    """The reduction axes of ``x`` (default: all but 0; must include the feature axis)."""
    if reduction_axes is None:
        if axis == 0:
            raise ValueError("feature_axis must not be the batch axis 0")
        return tuple(range(1, ndim))
    reduction = canonicalize_axes(reduction_axes, ndim, "reduction_axes")
    if axis not in reduction:
        raise ValueError(
            f"reduction_axes={reduction_axes!r} must include the feature axis {axis}"
        )
    return reduction


def group_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    num_groups: int | None = 32, group_size: int | None = None, feature_axis: int = -1,
    reduction_axes: Axes | None = None, eps: float = 1e-6, mask: Array | None = None,
    axis_name: Any = None, axis_index_groups: Any = None, dtype: Any = None,
    fast_variance: bool = False, implementation: str | None = None,
) -> Array:
    r"""Group normalization (Wu & He 2018).

    The :math:`C` channels are split into :math:`G` groups of :math:`C/G`; statistics per
    example and group, over the group's channels and every other reduction axis:
    :math:`y = (x - \mu_{n,g})/\sqrt{\sigma^2_{n,g} + \epsilon}\,\gamma_c + \beta_c`.
    One group is LayerNorm over the reduction axes; :math:`C` groups is InstanceNorm.

    Args:
      x: floating input.
      scale: :math:`\gamma` of shape ``(C,)``, or None.
      bias: :math:`\beta` of shape ``(C,)``, or None.
      num_groups: :math:`G` (exactly one of ``num_groups`` and ``group_size``).
      group_size: :math:`C/G` (pass ``num_groups=None`` with it).
      feature_axis: the channel axis (``1`` serves NCHW).
      reduction_axes: the axes the statistics span, including ``feature_axis`` (Flax's
        argument); default: every axis except 0. Axes outside it are batch axes.
      eps: :math:`\epsilon`, non-negative.
      mask: boolean, broadcastable to ``x``; ``False`` elements do not count.
      axis_name: combine the statistics across this mapped axis.
      axis_index_groups: groups within ``axis_name``.
      dtype: output dtype; default: promoted dtype of ``x``, ``scale``, ``bias``.
      fast_variance: Flax's one-pass variance (see :func:`jaxnorm.moments`).
      implementation: ``"xla"``, ``"pallas"`` (the Pallas GPU kernels of
        :mod:`jaxnorm._pallas_group_norm`, run in interpret mode off a GPU: channels-last
        only, statistics over every axis but 0, always the stable variance, no
        ``mask``/``axis_name``), or None (automatic: XLA for now;
        :mod:`jaxnorm._pallas_dispatch` routes it).

    Returns:
      ``y``, the shape of ``x``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> x = jnp.array([[0.0, 2.0, 10.0, 14.0]])
      >>> jaxnorm.group_norm(x, num_groups=2, eps=0.0).tolist()
      [[-1.0, 1.0, -1.0, 1.0]]
    """
    x = check_floating(x, allow_complex=True)
    axis = canonicalize_axis(feature_axis, x.ndim, "feature_axis")
    reduction = _grouped_reduction(x.ndim, axis, reduction_axes)
    channels = x.shape[axis]
    groups = resolve_num_groups(channels, num_groups, group_size)
    return _normalize_groups(
        x, scale, bias, axis, reduction, groups, eps=eps, mask=mask, axis_name=axis_name,
        axis_index_groups=axis_index_groups, dtype=dtype, fast_variance=fast_variance,
        implementation=implementation,
    )


def _normalize_groups(
    x: Array, scale: Array | None, bias: Array | None, axis: int,
    reduction: tuple[int, ...], groups: int, **options: Any,
) -> Array:
    """:func:`group_norm` of ``x`` with the channel axis viewed as ``(groups, channels
    per group)``, normalized over the grouped reduction by
    :func:`jaxnorm._normalize.normalize_with_moments` (``options``: its keyword
    arguments), which the dispatcher hands to the GroupNorm kernel where it applies."""
    channels = x.shape[axis]
    mask = broadcast_mask(options.pop("mask"), x.shape)
    grouped_shape = x.shape[:axis] + (groups, channels // groups) + x.shape[axis + 1 :]

    def grouped(value: Array | None, shape: tuple[int, ...]) -> Array | None:
        return None if value is None else value.reshape(shape)

    # In the grouped array, axis `axis` holds the group and `axis + 1` the channel within it.
    scale, bias = (grouped(check_shape(p, (channels,), name), (groups, channels // groups))
                   for p, name in ((scale, "scale"), (bias, "bias")))
    y = normalize_with_moments(
        x.reshape(grouped_shape), tuple(a if a < axis else a + 1 for a in reduction), scale,
        bias, feature_axes=(axis, axis + 1), mask=grouped(mask, grouped_shape),
        layer="GroupNorm", statistics=False, **options,
    )[0]
    return y.reshape(x.shape)
