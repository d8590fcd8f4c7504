r"""Running statistics: the ``batch_stats`` a BatchNorm layer keeps between batches.

* :class:`BatchMoments` — what one training batch reports: per-channel mean, biased
  variance, element count (over every device) and number of groups with their own mean;
* :func:`update_running_statistics` — the running averages
  :math:`ra \leftarrow m\,ra + (1-m)\,b` (Flax's momentum convention), or with
  ``momentum=None`` the exact cumulative average :math:`ra_k = ra_{k-1} + (b_k -
  ra_{k-1})/k` over the ``k`` batches seen (PyTorch's ``momentum=None``); ``unbiased``
  stores :math:`n/(n-1)\,\sigma^2_B` like PyTorch;
* :func:`merge_moments` — two batches' moments as one (a layer called twice per step).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._axes import check_momentum

Array = jax.Array

MOMENTS_COLLECTION = "batch_moments"
"""Linen collection where BatchNorm layers put their batch moments when it is mutable
(used by :func:`jaxnorm.recompute_batch_stats`)."""


class BatchMoments(NamedTuple):
    r"""Per-channel statistics of one training batch: mean, biased variance, the number of
    elements (over every device) they were computed from, and the number of (non-empty)
    groups with their own mean: 1, or the ghost batches. For ghost batches ``var`` is the
    pooled within-group variance :math:`\sum_g n_g\sigma_g^2 / \sum_g n_g`."""

    mean: Array
    var: Array
    count: Array
    groups: Array | int = 1


class RunningStatistics(NamedTuple):
    """The ``batch_stats`` of a BatchNorm layer; ``count`` (batches seen) only when
    ``momentum=None``."""

    mean: Array
    var: Array
    count: Array | None = None


def merge_moments(first: BatchMoments, second: BatchMoments) -> BatchMoments:
    r"""The moments of two batches together (Chan et al. 1979): with :math:`n = n_a + n_b`
    and :math:`\delta = \mu_b - \mu_a`, :math:`\mu = \mu_a + \delta n_b/n` and
    :math:`\sigma^2 = (n_a\sigma_a^2 + n_b\sigma_b^2 + \delta^2 n_a n_b/n)/n`. Used when
    one layer runs more than once in a forward pass (shared weights)."""
    total = first.count + second.count
    safe_total = jnp.maximum(total, 1)
    delta = second.mean - first.mean
    mean = first.mean + delta * second.count / safe_total
    spread = first.count * first.var + second.count * second.var
    var = (spread + delta * delta * first.count * second.count / safe_total) / safe_total
    return BatchMoments(mean, var, total, first.groups + second.groups)


def update_running_statistics(
    running: RunningStatistics, batch: BatchMoments, *, momentum: float | None,
    unbiased: bool = False,
) -> RunningStatistics:
    r"""The new ``batch_stats`` after one training batch.

    :math:`ra \leftarrow m\,ra + (1-m)\,b` for ``momentum`` :math:`m`, or with
    ``momentum=None`` the cumulative average :math:`ra_k = ra_{k-1} + (b_k - ra_{k-1})/k`.
    The update runs in at least float32 and is stored in the promoted dtype of the running
    and batch statistics (as Flax's update does), so small steps are not rounded away in a
    half-precision ``param_dtype``. A channel with nothing counted in the batch (fully
    masked, or an empty batch) keeps its running mean and variance; ``count`` advances
    only when some channel counted.

    Args:
      running: the current :class:`RunningStatistics` (``count`` needed with
        ``momentum=None``).
      batch: the batch's :class:`BatchMoments` (``jaxnorm.batch_norm(...,
        return_moments=True)``).
      momentum: the decay :math:`m \in [0, 1]` of the running average, or None for the
        cumulative average.
      unbiased: store :math:`n/(n-1)\,\sigma^2_B` (:math:`n`: the batch's element count
        per channel over all devices; for ghost batches the pooled
        :math:`\sum_g n_g\sigma_g^2/\sum_g(n_g-1)`), PyTorch's convention.

    Returns:
      The new :class:`RunningStatistics`, without gradient.

    Example:
      >>> import jax.numpy as jnp, jaxnorm
      >>> running = jaxnorm.RunningStatistics(jnp.zeros(1), jnp.ones(1))
      >>> batch = jaxnorm.BatchMoments(jnp.ones(1), jnp.ones(1), jnp.full(1, 8.0))
      >>> float(jaxnorm.update_running_statistics(running, batch, momentum=0.9).mean[0])
      0.1
    """
    check_momentum(momentum)
    dtype = jnp.promote_types(jnp.promote_types(running.mean.dtype, batch.mean.dtype),
                              jnp.float32)
    counted = batch.count > 0
    var = batch.var
    if unbiased:
        var = var * batch.count / jnp.maximum(batch.count - batch.groups, 1)
    if momentum is None:
        if running.count is None:
            raise ValueError("momentum=None needs a batch count in the running statistics")
        seen = running.count + jnp.any(counted).astype(running.count.dtype)
        weight = 1 / jnp.maximum(seen, 1).astype(dtype)

        def average(old: Array, new: Array) -> Array:
            return old + (new - old) * weight
    else:
        seen = running.count

        def average(old: Array, new: Array) -> Array:
            return momentum * old + (1 - momentum) * new

    def blend(old: Array, new: Array) -> Array:
        old = old.astype(dtype)
        return lax.stop_gradient(jnp.where(counted, average(old, new.astype(dtype)), old))

    return RunningStatistics(blend(running.mean, batch.mean), blend(running.var, var), seen)
