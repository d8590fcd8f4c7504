r"""Ghost batch statistics across the members of a ``vmap`` axis, in one collective.

``lax.psum`` under ``vmap`` takes no ``axis_index_groups``, so the groups are formed by
hand: member :math:`i` of the mapped axis belongs to ghost batch :math:`g = \lfloor i /
k\rfloor` (:math:`k` = ``virtual_batch_size``). Each member's own stable statistics
:math:`(n_i, \mu_i, \sigma^2_i)` (:func:`jaxnorm.moments`) are gathered with one
``all_gather`` per axis name and merged exactly per group, with no shared shift:

.. math::
    N_g = \sum_{i\in g} n_i,\quad \mu_g = \frac{1}{N_g}\sum_{i\in g} n_i\mu_i,\quad
    \sigma^2_g = \frac{1}{N_g}\sum_{i\in g} n_i\big(\sigma^2_i + (\mu_i - \mu_g)^2\big).

The same path (one group of every member) serves a tuple of axis names (nested ``vmap``):
``lax.all_gather`` over several names at once fails under nested ``vmap`` (JAX: "axis size
doesn't match"), so the names are gathered one at a time, innermost first.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

import jaxnorm
from jaxnorm.equinox._common import AxisName

Array = jax.Array


def _member_moments(x: Array, mask: Array | None) -> Array:
    """``(3, C)``: one member's count, mean and biased variance per channel."""
    spatial = tuple(range(1, x.ndim))
    mean, var = jaxnorm.moments(x, spatial, mask=mask)
    if mask is None:
        count = jnp.full(mean.shape, math.prod(x.shape[1:]), mean.dtype)
    else:
        count = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=spatial, dtype=mean.dtype)
    return jnp.stack([count, mean, var])


def _merged(gathered: Array) -> tuple[Array, Array, Array]:
    """``(mean, var, count)`` of each group from its members' ``(G, k, 3, C)`` moments."""
    count, mean, var = gathered[:, :, 0], gathered[:, :, 1], gathered[:, :, 2]
    total = jnp.sum(count, axis=1)
    safe = jnp.maximum(total, 1)
    group_mean = jnp.sum(count * mean, axis=1) / safe
    spread = var + jnp.square(mean - group_mean[:, None])
    return group_mean, jnp.sum(count * spread, axis=1) / safe, total


def axis_names(axis_name: AxisName) -> tuple:
    """``axis_name`` as a tuple of names."""
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def members_of(axis_name: AxisName) -> int:
    """The number of members of the (possibly nested) mapped axes."""
    return math.prod(lax.axis_size(name) for name in axis_names(axis_name))


def _all_gathered(value: Array, axis_name: AxisName) -> Array:
    """Every member's ``value`` stacked on a new axis 0 in ``lax.axis_index`` order."""
    names = axis_names(axis_name)
    for name in reversed(names):
        value = lax.all_gather(value, name)
    return value.reshape((-1,) + value.shape[len(names):])


def _group_moments(x: Array, mask: Array | None, axis_name: AxisName,
                   size: int) -> tuple[Array, Array, Array, Array]:
    """``(means, variances, counts, g)``: every group's ``(G, C)`` statistics and this
    member's group ``g``."""
    members = members_of(axis_name)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or members % size:
        raise ValueError(f"virtual_batch_size={size!r} must be a positive int dividing the "
                         f"{members} members of axis_name={axis_name!r}")
    gathered = _all_gathered(_member_moments(x, mask), axis_name)
    means, variances, counts = _merged(gathered.reshape((members // size, size)
                                                        + gathered.shape[1:]))
    return means, variances, counts, lax.axis_index(axis_names(axis_name)) // size


def ghost_batch_norm(
    x: Array, weight: Array | None, bias: Array | None, *, eps: float, axis_name: AxisName,
    size: int, mask: Array | None = None,
) -> tuple[Array, jaxnorm.BatchMoments]:
    r"""Batch norm of one member with the statistics of its ghost batch.

    :math:`y = (x - \mu_g)/\sqrt{\sigma^2_g + \epsilon}\,\gamma + \beta`; the returned
    moments pool the groups for the running averages: count-weighted mean, pooled
    within-group variance :math:`\sum_g N_g\sigma^2_g/\sum_g N_g`, total count and the
    non-empty groups (as :func:`jaxnorm.batch_norm` with ``virtual_batch_size``).

    Args:
      x: one member's input, channels first ``(C, *spatial)``.
      weight: :math:`\gamma` of shape ``(C,)``, or None.
      bias: :math:`\beta` of shape ``(C,)``, or None.
      eps: :math:`\epsilon`.
      axis_name: the ``vmap`` axis (or axes) whose members form the batch.
      size: :math:`k`, members per ghost batch; it must divide the axis size.
      mask: boolean, broadcastable to ``x``; ``False`` elements do not count.

    Returns:
      ``(y, moments)``.
    """
    means, variances, counts, group = _group_moments(x, mask, axis_name, size)
    y = jaxnorm.batch_norm_inference(x, means[group], variances[group], weight, bias,
                                     axis=0, eps=eps)
    total = jnp.sum(counts, axis=0)
    safe = jnp.maximum(total, 1)
    moments = jaxnorm.BatchMoments(
        jnp.sum(counts * means, axis=0) / safe, jnp.sum(counts * variances, axis=0) / safe,
        total, jnp.sum(counts > 0, axis=0, dtype=total.dtype))
    return y, moments
