r"""Batch normalization (Ioffe & Szegedy 2015), with its training-time options.

* ghost batches (Hoffer et al. 2017, "Train longer, generalize better"): statistics per
  consecutive group of ``virtual_batch_size`` examples;
* batch renormalization (Ioffe 2017):

  .. math::
      r = \mathrm{sg}\big(\mathrm{clip}_{[1/r_{max},\,r_{max}]}(\sigma_B/\sigma)\big),\quad
      d = \mathrm{sg}\big(\mathrm{clip}_{[-d_{max},\,d_{max}]}((\mu_B-\mu)/\sigma)\big),\quad
      y = \Big(\frac{x-\mu_B}{\sigma_B}\,r + d\Big)\gamma + \beta,

  with :math:`\sigma_B = \sqrt{\sigma_B^2+\epsilon}`, :math:`\sigma = \sqrt{\sigma^2_{run}
  +\epsilon}` and ``sg`` = ``stop_gradient``.

The running averages are a separate pure function, :func:`jaxnorm.update_running_statistics`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._affine import NormSpec, affine_coefficients, compute_dtype, output_dtype
from jaxnorm._axes import (
    Axes,
    broadcast_mask,
    canonicalize_axes,
    check_floating,
    check_shape,
    complement_axes,
    expand_to_rank,
    feature_shape,
)
from jaxnorm._dispatch import normalize_over
from jaxnorm._normalize import feature_parameters, static_eps
from jaxnorm._running import BatchMoments
from jaxnorm._sharding import explicit_shards
from jaxnorm._stats import moments_and_count

Array = jax.Array


class Renorm(NamedTuple):
    r"""Batch renormalization's inputs (Ioffe 2017), for :func:`jaxnorm.batch_norm`:
    :math:`r = \mathrm{clip}(\sigma_B/\sigma, 1/r_{max}, r_{max})`,
    :math:`d = \mathrm{clip}((\mu_B - \mu)/\sigma, -d_{max}, d_{max})` with
    :math:`\mu, \sigma` from the running statistics.

    Attributes:
      running_mean: the running mean :math:`\mu`, feature shape.
      running_var: the stored running variance, feature shape;
        :math:`\sigma = \sqrt{\text{running\_var} + \epsilon}`.
      r_max: the largest correction :math:`r`, at least 1 (1 disables it); a traced value
        (e.g. a schedule's) passes unchecked.
      d_max: the largest correction :math:`|d|`, at least 0 (0 disables it).
    """

    running_mean: Array
    running_var: Array
    r_max: Any = 3.0
    d_max: Any = 5.0


class _Grouping(NamedTuple):
    """``x`` (and its mask) as the statistics see it: with ghost batches the batch axis 0
    split into ``(groups, size)``, the group axis joining the feature axes."""

    x: Array
    mask: Array | None
    features: tuple[int, ...]
    reduction: tuple[int, ...]


def _group(
    x: Array, mask: Array | None, features: tuple[int, ...], size: int | None
) -> _Grouping:
    if size is None:
        return _Grouping(x, mask, features, complement_axes(x.ndim, features))
    if 0 in features:
        raise ValueError("virtual_batch_size needs a batch axis 0 that is not a feature axis")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or x.shape[0] % size:
        raise ValueError(
            f"virtual_batch_size={size!r} must be a positive int dividing the batch size "
            f"{x.shape[0]}"
        )
    shards = explicit_shards(x).get(0, 1)
    if (x.shape[0] // shards) % size:
        raise ValueError(
            f"virtual_batch_size={size!r} must divide the {x.shape[0] // shards} examples each "
            f"of the {shards} shards of the explicitly sharded batch holds: a ghost batch "
            "spanning devices would need their data moved"
        )
    shape = (x.shape[0] // size, size) + x.shape[1:]
    grouped_features = (0,) + tuple(a + 1 for a in features)
    return _Grouping(
        x.reshape(shape),
        None if mask is None else mask.reshape(shape),
        grouped_features,
        complement_axes(len(shape), grouped_features),
    )


def _renorm_parameters(
    renorm: Renorm, mean: Array, var: Array, count: Array, scale: Array | None,
    bias: Array | None, eps: Any,
) -> tuple[Array, Array]:
    r"""The scale :math:`\gamma r` and bias :math:`\beta + \gamma d` that turn plain
    normalization into batch renormalization; arguments broadcast together."""
    running_std = jnp.sqrt(renorm.running_var.astype(var.dtype) + eps)
    r = jnp.clip(jnp.sqrt(var + eps) / running_std, 1 / renorm.r_max, renorm.r_max)
    d = jnp.where(count > 0, (mean - renorm.running_mean.astype(mean.dtype)) / running_std, 0)
    r, d = lax.stop_gradient(r), lax.stop_gradient(jnp.clip(d, -renorm.d_max, renorm.d_max))
    gamma = r if scale is None else scale * r
    beta = d if scale is None else scale * d
    return gamma, beta if bias is None else bias + beta


def _pooled_moments(
    mean: Array, var: Array, count: Array, axis_name: Any, axis_index_groups: Any
) -> BatchMoments:
    r"""Ghost batches' moments (axis 0: the group) summarised for the running averages:
    the count-weighted mean and the pooled within-group variance
    :math:`\sum_g n_g\sigma_g^2 / \sum_g n_g`, summed over ``axis_name``."""
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
    return BatchMoments(mean_sum / safe_total, var_sum / safe_total, total, groups)


def _check_spread(grouping: _Grouping, synced: bool, x: Array, axis: Any,
                  virtual_batch_size: int | None) -> None:
    """Raises unless each channel's training statistics see more than one value."""
    per_channel = math.prod(grouping.x.shape[a] for a in grouping.reduction)
    if per_channel <= 1 and not synced:
        ghost = "" if virtual_batch_size is None else f", virtual_batch_size={virtual_batch_size}"
        raise ValueError(
            f"BatchNorm in training mode needs more than one value per channel; got x of "
            f"shape {x.shape} with axis={axis!r}{ghost} (allow_single_value=True accepts it, "
            "as the Linen and NNX modules do)"
        )


def _batch_moments(
    grouping: _Grouping, mean: Array, var: Array, count: Array, axis_name: Any,
    axis_index_groups: Any, ghost: bool,
) -> BatchMoments:
    """Feature-shaped batch moments with the element count over every device (``count``
    already summed across ``axis_name`` unless the statistics are per ghost batch)."""
    shape = feature_shape(grouping.x.shape, grouping.features)
    count = jnp.broadcast_to(count, mean.shape).astype(mean.real.dtype)
    mean, var, count = (v.reshape(shape) for v in (mean, var, count))
    if ghost:
        return _pooled_moments(mean, var, count, axis_name, axis_index_groups)
    return BatchMoments(mean, var, count)


def batch_norm(
    x: Array, scale: Array | None = None, bias: Array | None = None, *, axis: Axes = -1,
    eps: float = 1e-5, mask: Array | None = None, axis_name: Any = None,
    axis_index_groups: Any = None, dtype: Any = None, virtual_batch_size: int | None = None,
    renorm: Renorm | None = None, fast_variance: bool = False,
    allow_single_value: bool = False, return_moments: bool = False, pivot: Array | None = None,
) -> tuple[Array, Array, Array] | tuple[Array, BatchMoments]:
    r"""Training-mode batch normalization: statistics over every axis except ``axis``.

    :math:`y = (x - \mu_B)\,\gamma / \sqrt{\sigma_B^2 + \epsilon} + \beta` (module
    docstring for the ghost-batch and renormalization options; examples in the API docs).

    Args:
      x: floating input.
      scale: :math:`\gamma` of the feature shape ``tuple(x.shape[a] for a in axis)``.
      bias: :math:`\beta` of the feature shape.
      axis: the feature axes (int or tuple).
      eps: :math:`\epsilon`, non-negative.
      mask: boolean, broadcastable to ``x``; ``False`` elements do not count.
      axis_name: combine the batch statistics across this mapped axis, count-weighted.
      axis_index_groups: groups within ``axis_name``.
      dtype: output dtype; default: promoted dtype of ``x``, ``scale``, ``bias``.
      virtual_batch_size: ghost batch norm: statistics per group of this many examples.
      renorm: a :class:`jaxnorm.Renorm` for batch renormalization, or None.
      fast_variance: Flax's one-pass variance (see :func:`jaxnorm.moments`).
      allow_single_value: accept one value per channel (output ``bias``, variance 0), as
        Flax's modules do; by default it raises ``ValueError``.
      return_moments: return ``(y, BatchMoments)`` (for the running-statistics update).
      pivot: deprecated and ignored (a ``DeprecationWarning``): synchronized statistics
        no longer need a shared shift; every member's own stable statistics are gathered
        and merged exactly, in one collective (:func:`jaxnorm.moments`).

    Returns:
      ``(y, mean, var)``: the biased batch mean and variance in feature shape, at least
      float32 (with ghost batches: the groups' mean and pooled variance).
    """
    x = check_floating(x, allow_complex=True)
    features = canonicalize_axes(axis, x.ndim, "axis")
    spec_eps, traced_eps = static_eps(eps)
    scale, bias = feature_parameters(x, scale, bias, features)
    grouping = _group(x, broadcast_mask(mask, x.shape), features, virtual_batch_size)
    ghost = virtual_batch_size is not None
    # Ghost batches are consecutive examples, so each lies on one device: local statistics.
    stats_axis = None if ghost else axis_name
    if not allow_single_value:
        _check_spread(grouping, stats_axis is not None, x, axis, virtual_batch_size)
    spec = NormSpec(grouping.reduction, spec_eps, output_dtype(dtype, x, scale, bias), True,
                    fast_variance)
    if pivot is not None:
        warnings.warn("batch_norm's `pivot` is ignored: synchronized statistics are merged "
                      "exactly without one", DeprecationWarning, stacklevel=2)
    y, mean, var, count = _normalize_groups(
        grouping, scale, bias, spec, _expanded_renorm(renorm, x, features), stats_axis,
        axis_index_groups, traced_eps, ghost,
    )
    moments = _batch_moments(grouping, mean, var, count, axis_name, axis_index_groups, ghost)
    if return_moments:
        return y.reshape(x.shape), moments
    return y.reshape(x.shape), moments.mean, moments.var


def _normalize_groups(
    grouping: _Grouping, scale: Array | None, bias: Array | None, spec: NormSpec,
    renorm: Renorm | None, axis_name: Any, axis_index_groups: Any, traced_eps: Any,
    ghost: bool,
) -> tuple[Array, Array, Array, Array]:
    """Normalizes the (grouped) batch: the dispatcher does plain BatchNorm; renormalization
    first takes the statistics, then corrects the parameters with them. Feature-shaped
    arrays arrive broadcastable to the ungrouped ``x``."""

    def grouped(value: Array | None) -> Array | None:
        # with ghost batches the group axis comes first
        return value if value is None or not ghost else value.reshape((1,) + value.shape)

    scale, bias = grouped(scale), grouped(bias)
    kwargs = {"mask": grouping.mask, "axis_name": axis_name,
              "axis_index_groups": axis_index_groups, "eps": traced_eps}
    if renorm is None:
        return normalize_over(grouping.x, scale, bias, spec, **kwargs)
    mean, var, count = moments_and_count(
        grouping.x, spec.reduction, mask=grouping.mask, axis_name=axis_name,
        axis_index_groups=axis_index_groups, fast_variance=spec.fast_variance,
    )
    renorm = renorm._replace(running_mean=grouped(renorm.running_mean),
                             running_var=grouped(renorm.running_var))
    eps = spec.eps if traced_eps is None else traced_eps
    scale, bias = _renorm_parameters(renorm, mean, var, count, scale, bias, eps)
    return normalize_over(grouping.x, scale, bias, spec, mean=mean, var=var, count=count,
                          **kwargs)


def _expanded_renorm(renorm: Renorm | None, x: Array, features: tuple[int, ...]) -> Any:
    """``renorm`` with its running statistics checked and broadcastable to ``x``."""
    if renorm is None:
        return None
    running_mean, running_var = feature_parameters(
        x, renorm.running_mean, renorm.running_var, features,
        names=("renorm.running_mean", "renorm.running_var"),
    )
    return renorm._replace(running_mean=running_mean, running_var=running_var)


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

    Args:
      x: floating input.
      mean: the (running) mean, feature shape.
      var: the (running) variance, feature shape.
      scale: :math:`\gamma`, feature shape, or None.
      bias: :math:`\beta`, feature shape, or None.
      axis: the feature axes.
      eps: :math:`\epsilon`, non-negative.
      dtype: output dtype; default: promoted dtype of ``x``, ``scale``, ``bias``.

    Returns:
      ``y``, the shape of ``x``.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> y = jaxnorm.batch_norm_inference(jnp.array([[3.0]]), jnp.array([1.0]),
      ...                                  jnp.array([4.0]), eps=0.0)
      >>> float(y[0, 0])
      1.0
    """
    x = check_floating(x, allow_complex=True)
    features = canonicalize_axes(axis, x.ndim, "axis")
    static_eps(eps)
    shape = feature_shape(x.shape, features)
    mean = check_shape(mean, shape, "mean")
    var = check_shape(var, shape, "var")
    scale = check_shape(scale, shape, "scale")
    bias = check_shape(bias, shape, "bias")
    out_dtype = output_dtype(dtype, x, scale, bias)
    multiplier, offset = affine_coefficients(
        mean, var, scale, bias, eps, compute_dtype(x.dtype, out_dtype)
    )
    multiplier = expand_to_rank(multiplier, x.ndim, features)
    offset = expand_to_rank(offset, x.ndim, features)
    return (x.astype(multiplier.dtype) * multiplier + offset).astype(out_dtype)
