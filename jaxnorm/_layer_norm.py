r"""Layer normalization and RMS normalization: statistics per example over the last axes.

Both take the transformer options: a zero-centred scale (:math:`y = \hat x\,(1 + \gamma)`,
as Gemma and Transformer Engine store it) and, for RMS normalization, a bias.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._axes import Axes
from jaxnorm._normalize import normalize_with_moments

Array = jax.Array


def effective_scale(
    x: Array, scale: Array | None, bias: Array | None, dtype: Any, zero_centered: bool
) -> tuple[Array | None, Any]:
    r"""``(scale, dtype)`` to normalize with: with ``zero_centered`` the multiplier
    :math:`1 + \gamma`, formed in at least float32 so a half-precision :math:`\gamma` near 0
    keeps its digits, and the output dtype fixed to what the stored parameters give."""
    if scale is None or not zero_centered:
        return scale, dtype
    scale = jnp.asarray(scale)
    if dtype is None:
        dtype = jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
    return scale.astype(jnp.promote_types(scale.dtype, jnp.float32)) + 1, dtype


def layer_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    reduction_axes: Axes = -1, feature_axes: Axes = -1, eps: float = 1e-6,
    mask: Array | None = None, axis_name: Any = None, axis_index_groups: Any = None,
    dtype: Any = None, fast_variance: bool = False, zero_centered_scale: bool = False,
    implementation: str | None = None,
) -> Array:
    r"""Layer normalization (Ba et al. 2016): statistics per example over ``reduction_axes``.

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta,\qquad
        \mu, \sigma^2 \text{ over } S = \text{reduction\_axes},

    or :math:`y = \hat x\,(1 + \gamma) + \beta` with ``zero_centered_scale``.

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
      zero_centered_scale: ``scale`` holds :math:`\gamma` of the multiplier
        :math:`1 + \gamma` (Gemma, Transformer Engine's ``zero_centered_gamma``), so
        :math:`\gamma = 0` is the identity scale; the sum runs in at least float32.
      implementation: ``"xla"``, ``"pallas"`` (the Pallas GPU kernel of
        :mod:`jaxnorm._pallas_layer_norm`, run in interpret mode off a GPU; statistics
        over trailing axes only, always two-pass, no ``mask``/``axis_name``), or None
        (automatic: XLA for now; :mod:`jaxnorm._pallas_dispatch` routes it).

    Returns:
      ``y``, the shape of ``x``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> y = jaxnorm.layer_norm(jnp.array([[0.0, 2.0]]), eps=0.0)
      >>> y.tolist()
      [[-1.0, 1.0]]
    """
    scale, dtype = effective_scale(x, scale, bias, dtype, zero_centered_scale)
    return normalize_with_moments(
        x, reduction_axes, scale, bias, feature_axes=feature_axes, eps=eps, mask=mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype,
        fast_variance=fast_variance, implementation=implementation, layer="LayerNorm",
        statistics=False,
    )[0]


def rms_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *,
    reduction_axes: Axes = -1, feature_axes: Axes = -1, eps: float = 1e-6,
    mask: Array | None = None, axis_name: Any = None, axis_index_groups: Any = None,
    dtype: Any = None, zero_centered_scale: bool = False, implementation: str | None = None,
) -> Array:
    r"""RMS normalization (Zhang & Sennrich 2019): no centring.

    .. math::
        y = \frac{x}{\sqrt{E_S[x^2] + \epsilon}}\,\gamma + \beta,

    or :math:`y = x\,(1 + \gamma) / \sqrt{E_S[x^2] + \epsilon} + \beta` with
    ``zero_centered_scale`` (Gemma's RMSNorm).

    Args:
      x: floating input.
      scale: :math:`\gamma` of shape ``tuple(x.shape[a] for a in feature_axes)``, or None.
      bias: :math:`\beta`, the same shape, or None (the usual RMSNorm has none).
      reduction_axes: the axes :math:`S` of the mean square.
      feature_axes: the axes that carry ``scale`` and ``bias``.
      eps: :math:`\epsilon`, non-negative.
      mask: boolean, broadcastable to ``x``; ``False`` elements do not count.
      axis_name: combine the mean square across this mapped axis.
      axis_index_groups: groups within ``axis_name``.
      dtype: output dtype; default: promoted dtype of ``x``, ``scale``, ``bias``.
      zero_centered_scale: ``scale`` holds :math:`\gamma` of the multiplier
        :math:`1 + \gamma`, so :math:`\gamma = 0` is the identity scale; the sum runs in
        at least float32.
      implementation: ``"xla"``, ``"pallas"`` (the Pallas GPU kernel of
        :mod:`jaxnorm._pallas_layer_norm`, run in interpret mode off a GPU; statistics
        over trailing axes only, always two-pass, no ``mask``/``axis_name``), or None
        (automatic: XLA for now; :mod:`jaxnorm._pallas_dispatch` routes it).

    Returns:
      ``y``, the shape of ``x``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> jaxnorm.rms_norm(jnp.array([[3.0, 4.0]]), eps=0.0).round(4).tolist()
      [[0.8485, 1.1314]]
    """
    scale, dtype = effective_scale(x, scale, bias, dtype, zero_centered_scale)
    return normalize_with_moments(
        x, reduction_axes, scale, bias, feature_axes=feature_axes, eps=eps, mask=mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=dtype,
        centered=False, implementation=implementation, layer="RMSNorm", statistics=False,
    )[0]
