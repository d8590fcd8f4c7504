r"""A residual addition and the normalization after it in one call (pre-norm blocks).

A pre-norm block adds each sublayer's output to the residual stream and normalizes the new
stream for the next sublayer: :math:`s = x + r`, :math:`y = \mathrm{norm}(s)`, and both
:math:`y` and :math:`s` go on. :func:`add_and_norm` returns the pair from one expression:
under ``jit`` the sum is formed once, in the one kernel that reads ``x`` and ``r``, and the
normalization reads it as the stream it returns (no second addition, no second read of the
inputs); the normalization keeps its closed-form derivative, and the sum's derivative is the
identity, so :math:`\bar x = \bar r = \bar s + (\partial y/\partial s)^{\top}\bar y`.

Compiled by XLA (CPU, and an H200 ahead of time) the forward pass is the addition's loop
kernel followed by exactly the kernels of the normalization alone: XLA fuses an addition
into a normalization kernel only when the sum is not also an output, and a pre-norm block
needs the sum.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxnorm._axes import Axes, check_floating
from jaxnorm._layer_norm import layer_norm, rms_norm

Array = jax.Array

KINDS = ("layer", "rms")


def check_kind(kind: Any) -> str:
    """``kind`` if it names a normalization :func:`add_and_norm` knows; else ``ValueError``."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} (LayerNorm or RMSNorm), got {kind!r}")
    return kind


def add_and_norm(
    x: Array, residual: Array, scale: Array | None = None, bias: Array | None = None, *,
    kind: str = "layer", reduction_axes: Axes = -1, feature_axes: Axes = -1,
    eps: float = 1e-6, mask: Array | None = None, axis_name: Any = None,
    axis_index_groups: Any = None, dtype: Any = None, zero_centered_scale: bool = False,
) -> tuple[Array, Array]:
    r"""``(norm(x + residual), x + residual)``: the residual addition of a pre-norm block and
    the normalization of the new residual stream, the inputs read once.

    .. math::
        s = x + r,\qquad
        y = \frac{s - \mu_S}{\sqrt{\sigma^2_S + \epsilon}}\,\gamma + \beta
        \ \ (\texttt{kind="layer"}),\qquad
        y = \frac{s}{\sqrt{E_S[s^2] + \epsilon}}\,\gamma + \beta\ \ (\texttt{kind="rms"}),

    with :math:`1 + \gamma` in place of :math:`\gamma` under ``zero_centered_scale``. The
    gradients: :math:`\bar x = \bar r = \bar s + (\partial y / \partial s)^{\top} \bar y`.

    Args:
      x: floating input, the sublayer's output.
      residual: floating input of ``x``'s shape, the residual stream.
      scale: :math:`\gamma` of shape ``tuple(s.shape[a] for a in feature_axes)``, or None.
      bias: :math:`\beta`, the same shape, or None.
      kind: ``"layer"`` (:func:`jaxnorm.layer_norm`) or ``"rms"`` (:func:`jaxnorm.rms_norm`).
      reduction_axes: the axes :math:`S` of the statistics.
      feature_axes: the axes that carry ``scale`` and ``bias``.
      eps: :math:`\epsilon`, non-negative.
      mask: boolean, broadcastable to ``x``; ``False`` elements do not count in the
        statistics (the sum is returned everywhere).
      axis_name: combine the statistics across this mapped axis (sequence parallelism).
      axis_index_groups: groups within ``axis_name``.
      dtype: dtype of ``y``; default: promoted dtype of the sum, ``scale``, ``bias``.
      zero_centered_scale: ``scale`` holds :math:`\gamma` of the multiplier
        :math:`1 + \gamma` (Gemma, Transformer Engine).

    Returns:
      ``(y, s)``: the normalized sum and the sum :math:`s` in the promoted dtype of ``x``
      and ``residual`` (a float32 ``residual`` keeps a bfloat16 ``x``'s stream in float32).

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> y, s = jaxnorm.add_and_norm(jnp.array([[1.0, 2.0]]), jnp.array([[-1.0, 4.0]]),
      ...                             eps=0.0)
      >>> s.tolist(), y.tolist()
      ([[0.0, 6.0]], [[-1.0, 1.0]])
    """
    kind = check_kind(kind)
    x = check_floating(x, "x")
    residual = check_floating(residual, "residual")
    if x.shape != residual.shape:
        raise ValueError(f"residual has shape {residual.shape} but x has shape {x.shape}")
    summed = x + residual
    options = {"reduction_axes": reduction_axes, "feature_axes": feature_axes, "eps": eps,
               "mask": mask, "axis_name": axis_name, "axis_index_groups": axis_index_groups,
               "dtype": dtype, "zero_centered_scale": zero_centered_scale}
    norm = layer_norm if kind == "layer" else rms_norm
    return norm(summed, scale, bias, **options), summed
