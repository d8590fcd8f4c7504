r"""Layer normalization and RMS normalization: statistics per example over the last axes."""

from __future__ import annotations

from typing import Any

import jax

from jaxnorm._axes import Axes
from jaxnorm._normalize import normalize

Array = jax.Array


def layer_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    reduction_axes: Axes = -1, feature_axes: Axes = -1, eps: float = 1e-6,
    mask: Array | None = None, axis_name: Any = None, axis_index_groups: Any = None,
    dtype: Any = None, fast_variance: bool = False,
) -> Array:
    r"""Layer normalization (Ba et al. 2016): statistics per example over ``reduction_axes``.

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta,\qquad
        \mu, \sigma^2 \text{ over } S = \text{reduction\_axes}.

    Args:
      x: floating input.
      scale: :math:`\gamma` of shape ``tuple(x.shape[a] for a in feature_axes)``, or None.
      bias: :math:`\beta`, the same shape, or None.
      reduction_axes: the axes the statistics are taken over.
      feature_axes: the axes that carry ``scale`` and ``bias``.
      eps: :math:`\epsilon`, non-negative.
      mask: boolean, broadcastable to ``x``; ``False`` elements do not count.
      axis_name: combine the statistics across this mapped axis (sequence parallelism).
      axis_index_groups: groups within ``axis_name``.
      dtype: output dtype; default: promoted dtype of ``x``, ``scale``, ``bias``.
      fast_variance: Flax's one-pass variance (see :func:`jaxnorm.moments`).

    Returns:
      ``y``, the shape of ``x``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> y = jaxnorm.layer_norm(jnp.array([[0.0, 2.0]]), eps=0.0)
      >>> y.tolist()
      [[-1.0, 1.0]]
    """
    return normalize(
        x, reduction_axes, scale, bias, feature_axes=feature_axes, eps=eps, mask=mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype,
        fast_variance=fast_variance,
    )


def rms_norm(
    x: Array, scale: Array | None = None, *, reduction_axes: Axes = -1,
    feature_axes: Axes = -1, eps: float = 1e-6, mask: Array | None = None,
    axis_name: Any = None, axis_index_groups: Any = None, dtype: Any = None,
) -> Array:
    r"""RMS normalization (Zhang & Sennrich 2019): no centring.

    .. math::
        y = \frac{x}{\sqrt{E_S[x^2] + \epsilon}}\,\gamma.

    Args:
      x: floating input.
      scale: :math:`\gamma` of shape ``tuple(x.shape[a] for a in feature_axes)``, or None.
      reduction_axes: the axes :math:`S` of the mean square.
      feature_axes: the axes that carry ``scale``.
      eps: :math:`\epsilon`, non-negative.
      mask: boolean, broadcastable to ``x``; ``False`` elements do not count.
      axis_name: combine the mean square across this mapped axis.
      axis_index_groups: groups within ``axis_name``.
      dtype: output dtype; default: promoted dtype of ``x`` and ``scale``.

    Returns:
      ``y``, the shape of ``x``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> jaxnorm.rms_norm(jnp.array([[3.0, 4.0]]), eps=0.0).round(4).tolist()
      [[0.8485, 1.1314]]
    """
    return normalize(
        x, reduction_axes, scale, feature_axes=feature_axes, eps=eps, mask=mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype,
        centered=False,
    )
