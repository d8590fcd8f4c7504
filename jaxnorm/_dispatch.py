r"""The one dispatcher: every normalization in jaxnorm ends in :func:`normalize_over`.

It chooses the path, one strategy per backend:

- **Pallas GPU kernels** (:mod:`jaxnorm._pallas_dispatch`): a normalization whose spec
  names a layer with a kernel (LayerNorm, RMSNorm, GroupNorm, InstanceNorm) goes there
  first; it returns ``y`` when ``implementation="pallas"`` (or automatic selection) and the
  case fit a kernel, else nothing and the XLA paths below run;
- **XLA**: the closed-form derivative of :mod:`jaxnorm._derivative` when the statistics
  are ``x``'s own and local (the hot path), otherwise :func:`jaxnorm.moments` (across
  devices, over sharded sets, or with a traced ``eps``) or the caller's statistics,
  differentiated op by op; both end in the affine of :mod:`jaxnorm._affine`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._affine import NormSpec, compute_dtype, scaled_rstd, standardize
from jaxnorm._derivative import normalize_with_statistics
from jaxnorm._pallas_dispatch import pallas_normalize
from jaxnorm._sharding import spanned_shards
from jaxnorm._stats import element_count, moments_and_count

Array = jax.Array


def normalize_over(
    x: Array, scale: Array | None, bias: Array | None, spec: NormSpec, *,
    mask: Array | None = None, axis_name: Any = None, axis_index_groups: Any = None,
    eps: Any = None, mean: Array | None = None, var: Array | None = None,
    count: Array | None = None, statistics: bool = True,
) -> tuple[Array, Array | None, Array | None, Array | None]:
    r"""``(y, mean, var, count)``: ``x`` normalized over ``spec.reduction``.

    A set with nothing counted (fully masked) outputs exactly ``bias`` (0 without bias).
    ``spec.implementation`` and ``spec.layer`` may send it to a Pallas kernel
    (:func:`jaxnorm._pallas_dispatch.pallas_normalize`; never with given statistics).

    Args:
      x: floating (or complex) input.
      scale: :math:`\gamma` broadcastable to ``x``, or None.
      bias: :math:`\beta` broadcastable to ``x``, or None.
      spec: the static settings (:class:`NormSpec`).
      mask: boolean of ``x``'s shape, or None.
      axis_name: combine the statistics across this mapped axis.
      axis_index_groups: groups within ``axis_name``.
      eps: a traced :math:`\epsilon` (overrides ``spec.eps``; takes the plain path).
      mean: given statistics (keepdims, with ``var``): no statistics are computed.
      var: given variance, with ``mean``.
      count: with given statistics, the number of elements they count (keepdims), or None.
      statistics: the caller uses ``mean``/``var``/``count``; False lets a Pallas kernel,
        which keeps them on chip, compute ``y``.

    Returns:
      ``y`` in ``spec.dtype``; ``mean``/``var`` keep the reduced axes, at least float32;
      ``count``: elements counted per set over every member (None for given statistics
      without ``count``). All three are None when a Pallas kernel computed ``y``.
    """
    if mean is None:
        y = pallas_normalize(x, scale, bias, spec, mask=mask, axis_name=axis_name, eps=eps,
                             statistics=statistics)
        if y is not None:
            return y, None, None, None
    real = not jnp.iscomplexobj(x)
    local = axis_name is None and not spanned_shards(x, spec.reduction)[0]
    if mean is None and local and eps is None and real:
        y, mean, var = normalize_with_statistics(x, scale, bias, mask, spec)
        return y, mean, var, element_count(x.shape, spec.reduction, mask, mean.real.dtype)
    if mean is None:
        mean, var, count = moments_and_count(
            x, spec.reduction, mask=mask, axis_name=axis_name,
            axis_index_groups=axis_index_groups, centered=spec.centered,
            fast_variance=spec.fast_variance,
        )
    eps = spec.eps if eps is None else eps
    compute = compute_dtype(x.dtype, spec.dtype)
    multiplier = scaled_rstd(var, scale, eps, compute)
    counted = None if mask is None or count is None else count > 0
    y = standardize(x, mean if spec.centered else None, multiplier, bias, spec.dtype, counted)
    return y, mean, var, count
