r"""Ghost batch statistics across the members of a ``vmap`` axis, in one collective.

``lax.psum`` under ``vmap`` takes no ``axis_index_groups``, so the groups are formed by
hand: member :math:`i` of the mapped axis belongs to ghost batch :math:`g = \lfloor i /
k\rfloor` (:math:`k` = ``virtual_batch_size``). Each member sums, per channel and relative
to a shared pivot :math:`p` (the running mean), :math:`(n_i,\ n_i(\mu_i - p),\
n_i(\sigma_i^2 + (\mu_i-p)^2))` from its own :func:`jaxnorm.moments`, places them in row
:math:`g` of a ``(G, 3, C)`` table, and one ``psum`` gives every member every group's
sums: :math:`\mu_g = p + S_1/N`, :math:`\sigma^2_g = S_2/N - (S_1/N)^2` — exact
count-weighted statistics of the group, accurate while :math:`|\mu_g - p|/\sigma_g` is
moderate (as :func:`jaxnorm.batch_norm`'s ``pivot``).
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp
from jax import lax

import jaxnorm
from jaxnorm.equinox._common import AxisName

Array = jax.Array


def _local_sums(x: Array, pivot: Array, mask: Array | None) -> Array:
    """``(3, C)``: a member's count, shifted sum and shifted sum of squares per channel."""
    spatial = tuple(range(1, x.ndim))
    mean, var = jaxnorm.moments(x, spatial, mask=mask)
    if mask is None:
        count = jnp.full(mean.shape, math.prod(x.shape[1:]), mean.dtype)
    else:
        count = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=spatial, dtype=mean.dtype)
    shift = mean - pivot.astype(mean.dtype)
    return jnp.stack([count, count * shift, count * (var + shift * shift)])


def _group_table(x: Array, pivot: Array, mask: Array | None, axis_name: AxisName,
                 size: int) -> tuple[Array, Array]:
    """``(table, g)``: every group's summed ``(3, C)`` rows (one ``psum``) and this
    member's group."""
    members = lax.axis_size(axis_name)
    if size <= 0 or members % size:
        raise ValueError(f"virtual_batch_size={size} must divide the {members} members of "
                         f"axis_name={axis_name!r}")
    group = lax.axis_index(axis_name) // size
    local = _local_sums(x, pivot, mask)
    rows = jax.nn.one_hot(group, members // size, dtype=local.dtype)
    table = lax.psum(rows[:, None, None] * local, axis_name)
    return table, group


def _statistics(sums: Array, pivot: Array) -> tuple[Array, Array, Array]:
    """``(mean, var, count)`` from summed ``(..., 3, C)`` rows."""
    count = sums[..., 0, :]
    safe = jnp.maximum(count, 1)
    offset = sums[..., 1, :] / safe
    var = jnp.maximum(sums[..., 2, :] / safe - offset * offset, 0)
    return pivot.astype(offset.dtype) + offset, var, count


def ghost_batch_norm(
    x: Array, weight: Array | None, bias: Array | None, *, eps: float, axis_name: AxisName,
    size: int, pivot: Array, mask: Array | None = None,
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
      pivot: the shared shift :math:`p`, shape ``(C,)``.
      mask: boolean, broadcastable to ``x``; ``False`` elements do not count.

    Returns:
      ``(y, moments)``.
    """
    table, group = _group_table(x, lax.stop_gradient(pivot), mask, axis_name, size)
    means, variances, counts = _statistics(table, lax.stop_gradient(pivot))
    y = jaxnorm.batch_norm_inference(x, means[group], variances[group], weight, bias,
                                     axis=0, eps=eps)
    total = jnp.sum(counts, axis=0)
    safe = jnp.maximum(total, 1)
    moments = jaxnorm.BatchMoments(
        jnp.sum(counts * means, axis=0) / safe, jnp.sum(counts * variances, axis=0) / safe,
        total, jnp.sum(counts > 0, axis=0, dtype=total.dtype))
    return y, moments

